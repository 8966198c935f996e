"""Build the DiNO-Diffusion latent diffusion model of a profile with the project's own code, and load it back.

``python -m medlib.diffusion build --profile tiny`` (or ``make ldm``) runs three resumable stages:

1. **data** (:func:`load_training_images`): unlabelled chest-radiograph phantoms of several acquisition
   sites (``diffusion.train_sites``; no label is read), patient-split into LDM-train and held-out
   images (``diffusion.heldout_fraction``). The ``paper`` profile reads ``data.sources[diffusion.source_key]``
   instead and drops its labels.
2. **VAE**: a small one-channel ``AutoencoderKL`` trained by :func:`medlib.diffusion.vae.train_vae`
   (reconstruction + KL), cached under ``cache_dir()/build/<name>/vae-<hash>``; its reconstruction quality
   (PSNR / SSIM) is measured on the held-out patients. With ``diffusion.pretrained_vae`` (``paper``:
   ``stabilityai/sd-vae-ft-mse``) the public VAE is loaded instead and stays frozen.
3. **UNet**: :func:`medlib.diffusion.train.train_ldm` on cached latents and the frozen condition encoder's
   global tokens (``diffusion.encoder``: ``ssl-natural-vit-*`` in the embedded profiles, DINOv2
   ViT-B/14 reg4 in ``paper``), resumable from its checkpoint (``--stop-after`` runs it in chunks).

The result is written as fp16 safetensors (``vae.safetensors``, ``unet.safetensors``) plus a model card
(``model_card.json``: recipe and its hash, the condition backbone and its weights hash, steps, device,
wall time, VAE reconstruction quality and FID / FD at build time) into ``medlib/diffusion/embedded/<name>/``
for the committed ``tiny`` profile and into ``cache_dir()/ldm/<profile>/<name>/`` for the others. The recipe hash
covers the training fields of the profile, the data, the code that shapes the weights AND the condition
backbone's weights, so the committed LDM is flagged stale (:func:`ldm_status`) when any of them changes;
:func:`get_ldm` then rebuilds it instead of sampling from a UNet trained on another encoder's tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import array_fingerprint, git_commit, save_json, stable_hash
from ..config import Profile, cache_dir, get_profile, resolve_device
from .sampling import to_gray as _to_gray

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
COMMITTED_PROFILES = ("tiny",)  # profiles whose LDM is committed under EMBEDDED_DIR
CARD_NAME = "model_card.json"
#: DiffusionConfig fields that shape the weights (the sampling / evaluation fields do not).
TRAIN_FIELDS = (
    "image_size", "train_sites", "n_per_site", "heldout_fraction", "source_key", "encoder", "encoder_image_size",
    "tokens", "pretrained_vae", "vae_channels", "vae_layers_per_block", "latent_channels", "vae_steps",
    "vae_batch_size", "vae_lr", "kl_weight", "unet_channels", "unet_layers_per_block", "cross_attention_dim",
    "attention_head_dim", "ldm_steps", "ldm_batch_size", "ldm_lr", "ldm_warmup_steps", "cond_dropout",
    "prediction_type", "min_snr_gamma", "ema_decay",
)
# code whose changes change the weights: whole files, plus the recipe functions of this module
RECIPE_SOURCES = ("diffusion/train.py", "diffusion/vae.py", "diffusion/pipeline.py")
RECIPE_FUNCTIONS = ("load_training_images", "_train_or_load_vae", "_make_pipeline", "_train_unet")
LDM_FAMILY = "cxr"  # the phantom family the LDM learns


class LDMNotBuiltError(FileNotFoundError):
    """The profile's LDM weights are not on this machine (build them with ``make ldm``)."""


@dataclass
class LDMData:
    """Unlabelled training images of the LDM and the held-out patients' images (same sites)."""

    train: np.ndarray  # uint8 (N, S, S)
    heldout: np.ndarray  # uint8 (M, S, S): patients never seen in training (FID reference, memorisation)
    train_sites: np.ndarray  # (N,) site of each training image (-1 for a real source)
    heldout_sites: np.ndarray
    name: str  # what the images are
    fingerprint: str = ""
    train_patients: np.ndarray | None = None  # (N,) patient ids (site-prefixed for phantoms)
    heldout_patients: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        """Counts per site for a table."""
        sites = sorted(set(self.train_sites.tolist()) | set(self.heldout_sites.tolist()))
        return {"data": self.name, "train_images": len(self.train), "heldout_images": len(self.heldout),
                "per_site_train": {int(s): int((self.train_sites == s).sum()) for s in sites},
                "per_site_heldout": {int(s): int((self.heldout_sites == s).sum()) for s in sites}}


@dataclass
class LDMHandle:
    """A loaded (or freshly built) LDM: the pipeline, its model card and where the weights came from."""

    pipe: Any  # DiNODiffusionPipeline
    card: dict[str, Any]
    source: str  # e.g. "committed (medlib/diffusion/embedded/ldm-cxr-64)", "built now", "cache"
    path: Path
    status: str = "fresh"
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- names and places


def ldm_name(profile: str | Profile) -> str:
    """``ldm-cxr-<size>`` (``-sdvae`` when a public VAE is used); the folder name of the profile's LDM."""
    cfg = get_profile(profile).diffusion
    return f"ldm-{LDM_FAMILY}-{cfg.image_size}" + ("-sdvae" if cfg.pretrained_vae else "")


def output_dir(profile: str | Profile) -> Path:
    """Committed folder for the ``tiny`` profile, ``cache_dir()/ldm/<profile>/<name>`` for the others."""
    p = get_profile(profile)
    root = EMBEDDED_DIR if p.name in COMMITTED_PROFILES else cache_dir() / "ldm" / p.name
    return root / ldm_name(p)


def work_dir(profile: str | Profile) -> Path:
    """Where the resumable VAE / UNet runs of a build live (``cache_dir()/build/<name>-<profile>``)."""
    p = get_profile(profile)
    return cache_dir() / "build" / f"{ldm_name(p)}-{p.name}"


# --------------------------------------------------------------------------- data


def _split_patients(patient_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the images whose patient is held out (a seeded share ``fraction`` of the patients)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"diffusion.heldout_fraction={fraction} must lie in (0, 1).")
    patients = np.unique(patient_ids)
    if len(patients) < 2:
        raise ValueError(f"the LDM data hold {len(patients)} patient(s); need at least 2 to hold some out.")
    rng = np.random.default_rng(seed)
    n_held = min(len(patients) - 1, max(1, int(round(fraction * len(patients)))))
    held = set(rng.permutation(patients)[:n_held].tolist())
    return np.array([pid in held for pid in patient_ids])


def load_training_images(profile: str | Profile, progress: bool = False) -> LDMData:
    """The LDM's unlabelled images (no label is read), resized to ``diffusion.image_size``, split by patient."""
    from ..data import phantoms
    from .vae import resize_images

    p = get_profile(profile)
    cfg = p.diffusion
    if cfg.source_key:
        from ..data.sources import load_source

        if cfg.source_key not in p.data.sources:
            raise ValueError(f"profile {p.name!r}: diffusion.source_key={cfg.source_key!r} is not in data.sources "
                             f"({sorted(p.data.sources)}); add the unlabelled chest X-ray source there.")
        ds = load_source(p.data.sources[cfg.source_key])
        images = resize_images(_to_gray(np.asarray(ds.images)), cfg.image_size)
        pids = np.asarray(ds.patient_ids).astype(str)
        sites = np.full(len(images), -1)
        name = f"{p.data.sources[cfg.source_key]} (labels dropped)"
    else:
        if not cfg.train_sites or cfg.n_per_site < 1:
            raise ValueError(f"profile {p.name!r}: diffusion.train_sites={cfg.train_sites} and n_per_site="
                             f"{cfg.n_per_site} must name at least one site and one image.")
        parts, pids, sites = [], [], []
        size = max(phantoms.MIN_SIZE, cfg.image_size)
        for site in cfg.train_sites:
            ds = phantoms.make_dataset(LDM_FAMILY, cfg.n_per_site, size=size, seed=p.seed, site=int(site),
                                       progress=progress)
            parts.append(resize_images(np.asarray(ds.images), cfg.image_size))
            pids.append(np.char.add(f"site{site}:", np.asarray(ds.patient_ids).astype(str)))
            sites.append(np.full(len(ds), int(site)))
        images, pids, sites = np.concatenate(parts), np.concatenate(pids), np.concatenate(sites)
        name = f"phantom:{LDM_FAMILY} sites {list(cfg.train_sites)}, {cfg.n_per_site} each (unlabelled)"
    held = _split_patients(pids, cfg.heldout_fraction, p.seed)
    train = np.ascontiguousarray(images[~held])
    return LDMData(train=train, heldout=np.ascontiguousarray(images[held]), train_sites=sites[~held],
                   heldout_sites=sites[held], name=name, fingerprint=array_fingerprint(train),
                   train_patients=pids[~held], heldout_patients=pids[held])


# --------------------------------------------------------------------------- components


def load_condition_backbone(profile: str | Profile):
    """The frozen condition backbone of the profile (``diffusion.encoder`` at ``encoder_image_size``).

    A ``random-*`` encoder (a baseline) is initialised from the profile's seed: the same every call.
    """
    from ..models.backbones import create_backbone, get_spec

    p = get_profile(profile)
    seed = p.seed if get_spec(p.diffusion.encoder).source == "random" else None
    return create_backbone(p.diffusion.encoder, image_size=p.diffusion.encoder_image_size, seed=seed)


def load_pretrained_vae(name: str, image_size: int):
    """A public diffusers ``AutoencoderKL`` by name or local folder (``paper``); a clear error when offline."""
    from diffusers import AutoencoderKL

    from ..models.backbones import locate_vae

    # the same rule as the backbones: a folder, the weights folders, the Hugging Face cache, an allowed download;
    # else fail at once (diffusers' own hub fallback would retry for a minute offline)
    folder, looked = locate_vae(name, download=True)
    if folder is None:
        raise LDMNotBuiltError(
            f"The VAE {name!r} is not on this machine; looked at: {'; '.join(looked)}. With internet: "
            f"`hf download {name}` (into the Hugging Face cache) or allow_download = true in the data file; "
            "offline: copy its folder (config.json + diffusion_pytorch_model.safetensors) into the weights folder "
            f"as {name.rsplit('/', 1)[-1]}/, or set diffusion.pretrained_vae to that folder.")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise LDMNotBuiltError(f"The VAE folder {folder} (for {name!r}) cannot be read: {err}") from err
    vae.register_to_config(sample_size=int(image_size))
    return vae.eval().requires_grad_(False)


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON-able data, without its bookkeeping keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=list))


def encoder_fingerprint(backbone: torch.nn.Module) -> str:
    """Hash of the condition backbone's weights (what makes a trained UNet go stale when they change)."""
    from .train import module_fingerprint

    return module_fingerprint(backbone)


def recipe_hash(profile: str | Profile, encoder_weights: str) -> str:
    """Hash of everything that shapes the LDM's weights: training fields, data, seed, code, encoder weights."""
    from ..data import phantoms
    from ..models.build import _normalised_source

    p = get_profile(profile)
    cfg = asdict(p.diffusion)
    payload = {
        "diffusion": {k: cfg[k] for k in TRAIN_FIELDS}, "seed": p.seed,
        "source": p.data.sources.get(p.diffusion.source_key, "") if p.diffusion.source_key else "",
        "data_generator": phantoms.GENERATOR_VERSION, "encoder_weights": encoder_weights,
        "code": {**{src: stable_hash(_normalised_source(src)) for src in RECIPE_SOURCES},
                 "diffusion/build.py": stable_hash(_normalised_source("diffusion/build.py", RECIPE_FUNCTIONS))},
    }
    return stable_hash(payload)


def _train_or_load_vae(p: Profile, data: LDMData, device: str, progress: bool, work: Path) -> tuple[Any, dict]:
    """The profile's VAE: the public one (paper), a cached trained one, or one trained now; plus build info."""
    from diffusers import AutoencoderKL

    from .vae import make_vae, reconstruction_metrics, train_vae

    cfg = p.diffusion
    if cfg.pretrained_vae:
        vae = load_pretrained_vae(cfg.pretrained_vae, cfg.image_size).to(device)
        quality = reconstruction_metrics(vae, data.heldout[:256])
        return vae, {"vae": cfg.pretrained_vae, "trained": False, "steps": 0, "wall_time_s": 0.0,
                     "heldout_psnr": quality["psnr"], "heldout_ssim": quality["ssim"]}
    from ..models.build import _normalised_source

    recipe = {k: getattr(cfg, k) for k in ("image_size", "vae_channels", "vae_layers_per_block", "latent_channels",
                                           "vae_steps", "vae_batch_size", "vae_lr", "kl_weight")}
    key = {"recipe": recipe, "data": data.fingerprint, "seed": p.seed,
           "code": stable_hash(_normalised_source("diffusion/vae.py"))}
    folder = work / f"vae-{stable_hash(key)}"
    info_path = folder / "vae_info.json"
    if info_path.is_file() and (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder).to(device).eval(), json.loads(info_path.read_text())
    vae = make_vae(cfg.image_size, seed=p.seed, latent_channels=cfg.latent_channels,
                   block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers_per_block)
    result = train_vae(vae, data.train, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr,
                       kl_weight=cfg.kl_weight, device=device, seed=p.seed, progress=progress)
    quality = reconstruction_metrics(result.vae, data.heldout[:256])
    tail = result.history.tail(max(1, len(result.history) // 10)).mean(numeric_only=True)
    info = {"vae": "trained here (AutoencoderKL, L1 + KL)", "trained": True, "steps": cfg.vae_steps,
            "batch_size": cfg.vae_batch_size, "wall_time_s": round(result.wall_time_s, 1),
            "seconds_per_step": round(result.wall_time_s / cfg.vae_steps, 4),
            "scaling_factor": result.scaling_factor, "heldout_psnr": quality["psnr"], "heldout_ssim": quality["ssim"],
            "final_rec_loss": float(tail["rec_loss"]), "final_kl": float(tail["kl"])}
    result.vae.save_pretrained(folder)
    save_json(info_path, info)
    return result.vae, info


def _make_pipeline(p: Profile, backbone: Any, vae: Any):
    """A fresh DiNO-Diffusion pipeline of the profile's UNet size around the VAE and the frozen backbone."""
    from .pipeline import build_pipeline

    cfg = p.diffusion
    return build_pipeline(backbone, vae, unet_block_out_channels=cfg.unet_channels,
                          layers_per_block=cfg.unet_layers_per_block, cross_attention_dim=cfg.cross_attention_dim,
                          attention_head_dim=cfg.attention_head_dim, scheduler=cfg.scheduler,
                          prediction_type=cfg.prediction_type, tokens=cfg.tokens, seed=p.seed)


def _train_unet(p: Profile, pipe: Any, data: LDMData, device: str, progress: bool, work: Path,
                stop_after: int | None):
    """Train (or resume) the UNet on the LDM training images; returns the LDMResult."""
    from .train import train_ldm

    cfg = p.diffusion
    return train_ldm(pipe, data.train, steps=cfg.ldm_steps, batch_size=cfg.ldm_batch_size, lr=cfg.ldm_lr,
                     cond_dropout=cfg.cond_dropout, min_snr_gamma=cfg.min_snr_gamma or None,
                     prediction_type=cfg.prediction_type, ema_decay=cfg.ema_decay, device=device, seed=p.seed,
                     out_dir=work / "ldm", progress=progress, warmup_steps=cfg.ldm_warmup_steps,
                     checkpoint_every=cfg.checkpoint_every, stop_after=stop_after, save_pipeline=False)


# --------------------------------------------------------------------------- evaluation at build time


def build_time_quality(pipe: Any, data: LDMData, profile: str | Profile, device: str = "cpu",
                       progress: bool = False) -> dict[str, Any]:
    """FID (when ``diffusion.fid``) and FD_SSL of reconstructions of held-out images at the default sampling."""
    from . import metrics
    from .sampling import generate

    p = get_profile(profile)
    cfg = p.diffusion
    n = min(cfg.n_fid, len(data.heldout))
    if n < 2:
        return {"skipped": f"only {n} held-out image(s)"}
    real = data.heldout[:n]
    fake = generate(pipe, images=real, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                    seed=p.seed, progress=progress)
    fd_backbone = metrics.fd_backbone_name(p)
    out: dict[str, Any] = {"n_real": n, "n_fake": int(len(fake)), "mode": "reconstruction of held-out images",
                           "guidance_scale": cfg.guidance_scale, "num_inference_steps": cfg.num_inference_steps,
                           "scheduler": cfg.scheduler, "fd_name": metrics.fd_name(fd_backbone),
                           "fd_ssl": metrics.fd_ssl(real, fake, fd_backbone, device=device)}
    if cfg.fid:
        scores = metrics.fid_kid(real, fake, device=device)
        out.update(fid=scores["fid"], kid_mean=scores["kid_mean"], kid_std=scores["kid_std"],
                   extractor=scores["extractor"])
    else:
        out["fid"] = None
        out["fid_skipped"] = f"profile {p.name!r} sets diffusion.fid=False (the Inception pass is slow on CPU)"
    return out


# --------------------------------------------------------------------------- build, status, load


def _shown(path: Path) -> str:
    """A path relative to the repository root when it lies inside it (for tables and messages)."""
    from ..config import display_path

    return display_path(path)


def _read_card(folder: Path) -> dict[str, Any] | None:
    path = folder / CARD_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def ldm_status(profile: str | Profile, backbone: Any = None) -> tuple[str, str]:
    """("fresh" | "stale" | "missing", reason) of the profile's LDM weights against the current recipe."""
    p = get_profile(profile)
    folder = output_dir(p)
    card = _read_card(folder)
    needed = ["unet.safetensors"] + ([] if p.diffusion.pretrained_vae else ["vae.safetensors"])
    if card is None or not all((folder / f).is_file() for f in needed):
        return "missing", f"no built LDM in {folder}"
    backbone = backbone if backbone is not None else load_condition_backbone(p)
    expected = recipe_hash(p, encoder_fingerprint(backbone))
    if card.get("recipe_hash") != expected:
        changed = "the condition backbone's weights changed" if card.get("condition_encoder", {}).get(
            "weights_hash") != encoder_fingerprint(backbone) else "the recipe (profile, data or code) changed"
        return "stale", f"{folder} was built from recipe {card.get('recipe_hash')}, now {expected}: {changed}"
    return "fresh", f"{folder} matches recipe {expected}"


def build_ldm(profile: str | Profile = "tiny", device: str = "auto", progress: bool = True, force: bool = False,
              stop_after: int | None = None, evaluate: bool = True) -> Path | None:
    """Build the profile's LDM (VAE, then UNet) and write fp16 weights + model card; resumable, cached.

    Returns the output folder, or None when ``stop_after`` ended the UNet run before ``ldm_steps`` (run the
    same command again to continue). Up-to-date weights are kept unless ``force``.
    """
    from ..engine import save_weights

    p = get_profile(profile)
    cfg = p.diffusion
    out = output_dir(p)
    backbone = load_condition_backbone(p)
    weights_hash = encoder_fingerprint(backbone)
    expected = recipe_hash(p, weights_hash)
    status, reason = ldm_status(p, backbone)
    if status == "fresh" and not force:
        print(f"[ldm] {ldm_name(p)} ({p.name}): up to date ({out})")
        return out
    print(f"[ldm] {ldm_name(p)} ({p.name}): building - {reason}")
    device = resolve_device(device)
    start = time.perf_counter()
    data = load_training_images(p, progress=progress)
    vae, vae_info = _train_or_load_vae(p, data, device, progress, work_dir(p))  # cached by its own recipe
    pipe = _make_pipeline(p, backbone, vae)
    result = _train_unet(p, pipe, data, device, progress, work_dir(p) / expected, stop_after)
    if result.steps_done < cfg.ldm_steps:
        print(f"[ldm] {ldm_name(p)}: {result.steps_done}/{cfg.ldm_steps} UNet steps done; run again to continue.")
        return None
    pipe.set_progress_bar_config(disable=True)
    quality = build_time_quality(pipe, data, p, device=device, progress=progress) if evaluate else {
        "skipped": "evaluate=False"}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"name": ldm_name(p), "recipe_hash": expected}
    save_weights(pipe.unet, out / "unet.safetensors", dtype=torch.float16, metadata=meta)
    if not cfg.pretrained_vae:
        save_weights(pipe.vae, out / "vae.safetensors", dtype=torch.float16, metadata=meta)
    history = result.history
    tail = history.tail(max(1, len(history) // 10)).mean(numeric_only=True)
    card = {
        "name": ldm_name(p), "profile": p.name, "recipe_hash": expected,
        "recipe": {k: asdict(cfg)[k] for k in TRAIN_FIELDS}, "seed": p.seed,
        "what": "latent diffusion model conditioned on the GLOBAL tokens (CLS, pooled, registers) of a frozen "
                "image encoder, trained by the project (the DiNO-Diffusion recipe of Jimenez-Perez et al. 2024)",
        "condition_encoder": {"name": backbone.name, "is_dinov2": bool(backbone.spec.is_dinov2),
                              "image_size": cfg.encoder_image_size, "tokens": list(pipe.image_encoder.config.tokens),
                              "num_tokens": pipe.num_condition_tokens, "weights_hash": weights_hash},
        "vae_config": _public(pipe.vae.config), "unet_config": _public(pipe.unet.config),
        "scheduler": {"kind": cfg.scheduler, "prediction_type": cfg.prediction_type,
                      "note": "the sampler is the profile's diffusion.scheduler; the noise schedule is fixed"},
        "data": {**data.describe(), "fingerprint": data.fingerprint, "labels_used": False},
        "vae_training": vae_info,
        "unet_training": {"steps": result.steps_done, "batch_size": cfg.ldm_batch_size,
                          "wall_time_s": round(result.wall_time_s, 1),
                          "seconds_per_step": round(result.wall_time_s / max(1, result.steps_done), 4),
                          "final_loss_mean_last_10pct": round(float(tail["loss"]), 5),
                          "final_mse_mean_last_10pct": round(float(tail["mse"]), 5)},
        "quality_at_build": quality,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.perf_counter() - start, 1),
        "built_from_commit": git_commit(), "dtype": "float16",
        "parameters": {"unet": int(sum(t.numel() for t in pipe.unet.parameters())),
                       "vae": int(sum(t.numel() for t in pipe.vae.parameters()))},
    }
    save_json(out / CARD_NAME, card)
    fid = quality.get("fid")
    print(f"[ldm] {ldm_name(p)}: {card['wall_time_s']:.0f} s, VAE held-out PSNR {vae_info['heldout_psnr']:.1f} dB, "
          f"{quality.get('fd_name', 'FD')} {quality.get('fd_ssl', float('nan')):.2f}"
          + (f", FID {fid:.1f}" if fid is not None else "") + f" -> {out}")
    return out


def load_ldm(profile: str | Profile, device: str = "cpu", allow_stale: bool = False) -> LDMHandle:
    """The built LDM of a profile as a pipeline (fp16 weights cast to fp32); raises when missing or stale."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..engine import load_weights
    from .pipeline import DinoConditionEncoder, DiNODiffusionPipeline, make_scheduler

    p = get_profile(profile)
    folder = output_dir(p)
    backbone = load_condition_backbone(p)
    status, reason = ldm_status(p, backbone)
    if status == "missing":
        raise LDMNotBuiltError(f"{reason}; build it with `python -m medlib.diffusion build --profile {p.name}` "
                               f"(make ldm PROFILE={p.name}).")
    if status == "stale" and not allow_stale:
        raise LDMNotBuiltError(f"{reason}; rebuild with `python -m medlib.diffusion build --profile {p.name}`.")
    card = _read_card(folder)
    if p.diffusion.pretrained_vae:
        vae = load_pretrained_vae(p.diffusion.pretrained_vae, p.diffusion.image_size)
    else:
        vae = AutoencoderKL(**card["vae_config"])
        vae.load_state_dict({k: v.float() for k, v in load_weights(folder / "vae.safetensors").items()})
    unet = UNet2DConditionModel(**card["unet_config"])
    unet.load_state_dict({k: v.float() for k, v in load_weights(folder / "unet.safetensors").items()})
    encoder = DinoConditionEncoder.from_backbone(backbone, tokens=card["condition_encoder"]["tokens"])
    scheduler = make_scheduler(p.diffusion.scheduler, card["scheduler"]["prediction_type"])  # sampler: profile
    pipe = DiNODiffusionPipeline(vae=vae.eval(), unet=unet.eval(), scheduler=scheduler, image_encoder=encoder)
    pipe.to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    where = "committed" if p.name in COMMITTED_PROFILES else "cache"
    return LDMHandle(pipe=pipe, card=card, source=f"{where} ({_shown(folder)})", path=folder, status=status,
                     notes=[reason.replace(str(folder), _shown(folder))])


def get_ldm(profile: str | Profile, device: str = "auto", progress: bool = True, build: bool = True) -> LDMHandle:
    """The profile's LDM: loaded when fresh, else built now by :func:`build_ldm` (resumable) and loaded.

    Under the active switches' ``compile`` (``medlib.accel``: the ``gpu`` / ``paper`` profiles on a GPU,
    ``gpu-switches`` on the CPU) the pipeline's UNet is compiled in place for sampling.
    """
    handle = _get_ldm(profile, device, progress, build)
    from ..accel import compile_unet

    if compile_unet(handle.pipe):
        handle.notes.append("UNet compiled (torch.compile) for sampling")
    return handle


def _get_ldm(profile: str | Profile, device: str, progress: bool, build: bool) -> LDMHandle:
    p = get_profile(profile)
    device = resolve_device(device)
    status, reason = ldm_status(p)
    if status != "fresh":
        if not build:
            raise LDMNotBuiltError(f"{reason}; build it with `python -m medlib.diffusion build --profile {p.name}`.")
        start = time.perf_counter()
        folder = build_ldm(p, device=device, progress=progress)
        if folder is None:  # pragma: no cover - build_ldm without stop_after always finishes
            raise RuntimeError("build_ldm stopped before the last step")
        handle = load_ldm(p, device=device)
        handle.source = (f"built now in {time.perf_counter() - start:.0f} s "
                         f"({reason.replace(str(folder), _shown(folder))}) -> {_shown(folder)}")
        return handle
    return load_ldm(p, device=device)


__all__ = [
    "CARD_NAME", "COMMITTED_PROFILES", "EMBEDDED_DIR", "LDMData", "LDMHandle", "LDMNotBuiltError", "TRAIN_FIELDS",
    "build_ldm", "build_time_quality", "encoder_fingerprint", "get_ldm", "ldm_name", "ldm_status",
    "load_condition_backbone", "load_ldm", "load_pretrained_vae", "load_training_images", "output_dir", "recipe_hash",
    "work_dir",
]
