"""Tests of medlib.data.transforms: tensors, normalisation, flips that are horizontal, joint mask geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlib.data.imageset import ImageSet
from medlib.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ClassificationTransform, SegmentationTransform,
                                    TorchImageDataset, normalize_batch, random_resized_crop_params,
                                    to_tensor_batch)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_tensor_batch_grey_and_rgb():
    grey = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = to_tensor_batch(grey, "cpu")
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), [[0.0, 1.0], [0.2, 0.4]], atol=1e-7)
    rgb = np.zeros((2, 4, 5, 3), np.uint8)
    rgb[..., 1] = 255
    out = to_tensor_batch(rgb)
    assert out.shape == (2, 3, 4, 5) and out[:, 1].min() == 1.0 and out[:, 0].max() == 0.0
    with pytest.raises(TypeError, match="uint8"):
        to_tensor_batch(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="\\(N, H, W\\) or \\(N, H, W, 3\\)"):
        to_tensor_batch(np.zeros((4, 4), np.uint8))


def test_normalize_batch_known_values():
    batch = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    batch[0, :, 0, 0] = 0.8
    minmax = normalize_batch(batch, "minmax")
    assert minmax.min() == 0.0 and minmax.max() == 1.0
    np.testing.assert_allclose(minmax[0, :, 1, 1].numpy(), [0.0, 1 / 3, 2 / 3], atol=1e-6)
    imagenet = normalize_batch(batch, "imagenet")
    expected = (minmax[0, :, 1, 1].numpy() - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(imagenet[0, :, 1, 1].numpy(), expected, atol=1e-5)
    assert torch.equal(normalize_batch(batch, "none"), batch)
    assert normalize_batch(torch.full((1, 3, 2, 2), 0.5), "minmax").abs().max() == 0.0
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_batch(batch, "zscore")


def test_eval_transform_resizes_shorter_side_and_centre_crops():
    image = np.tile((np.arange(64) * 4).astype(np.uint8), (64, 1))  # value = 4 x column
    transform = ClassificationTransform(56, train=False, normalize="none")
    assert transform.resize == 64  # 56 * 256 / 224
    out = transform(image)
    assert out.shape == (3, 56, 56)
    assert round(float(out[0, 0, 0]) * 255) == 16 and round(float(out[0, 0, -1]) * 255) == 236
    batch = transform(np.stack([image, image]))
    assert batch.shape == (2, 3, 56, 56) and torch.equal(batch[0], out)
    wide = ClassificationTransform(32, normalize="imagenet")(np.zeros((3, 40, 80), np.uint8))
    assert wide.shape == (3, 3, 32, 32) and torch.isfinite(wide).all()


def _half_and_band() -> np.ndarray:
    image = np.zeros((32, 32), np.uint8)
    image[:, :16] = 200  # left half bright
    image[:4, :] = 50  # a band along the top
    return image


def test_train_horizontal_flip_mirrors_the_width_not_the_height():
    image = _half_and_band()
    keep = ClassificationTransform(32, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, normalize="none")
    np.testing.assert_allclose(keep(image)[0].numpy() * 255, image, atol=1e-3)
    flip = ClassificationTransform(32, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, normalize="none")
    out = flip(image, generator=_gen(0))[0].numpy() * 255
    np.testing.assert_allclose(out, image[:, ::-1], atol=1e-3)
    assert np.allclose(out[:4], 50) and np.allclose(out[4:, 16:], 200) and np.allclose(out[4:, :16], 0)
    vertical = ClassificationTransform(32, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=1.0,
                                       normalize="none")
    np.testing.assert_allclose(vertical(image)[0].numpy() * 255, image[::-1], atol=1e-3)


def test_train_transform_is_reproducible_per_generator_and_varies_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 48, 48), dtype=np.uint8)
    transform = ClassificationTransform(32, train=True, rotation=10.0)
    a, b = transform(images, generator=_gen(5)), transform(images, generator=_gen(5))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, transform(images, generator=_gen(6)))
    same = transform(np.repeat(images[:1], 4, axis=0), generator=_gen(1))
    assert not torch.equal(same[0], same[1])  # each image draws its own crop / flip


def test_random_resized_crop_params_respect_scale_and_bounds():
    gen = _gen(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(60, 80, (0.3, 0.6), (3 / 4, 4 / 3), gen)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.27 <= h * w / (60 * 80) <= 0.63
    assert random_resized_crop_params(10, 100, (0.99, 1.0), (1.0, 1.0), gen) == (0, 45, 10, 10)  # fallback
    with pytest.raises(ValueError, match="scale must satisfy"):
        ClassificationTransform(32, train=True, scale=(0.5, 1.5))


def _squares() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[10:30, 12:28], mask[10:30, 12:28] = 120, 1
    image[36:56, 40:58], mask[36:56, 40:58] = 240, 2
    return image, mask


def _alignment(pixels: np.ndarray, label_map: np.ndarray, label: int, value: float) -> tuple[float, float]:
    """IoU and centroid distance between a mask label and its square seen in the image (half-height threshold)."""
    from scipy import ndimage

    in_mask = label_map == label
    near = ndimage.binary_dilation(in_mask, iterations=4)
    seen = (pixels > value / 2) & near
    iou = (in_mask & seen).sum() / (in_mask | seen).sum()
    distance = np.hypot(*(np.array(ndimage.center_of_mass(in_mask)) - np.array(ndimage.center_of_mass(seen))))
    return float(iou), float(distance)


@pytest.mark.parametrize("seed", range(6))
def test_segmentation_transform_keeps_the_mask_on_its_image(seed):
    image, mask = _squares()
    transform = SegmentationTransform(48, train=True, scale=(0.5, 1.0), rotation=20.0, hflip=0.5, vflip=0.5,
                                      normalize="none")
    out_image, out_mask = transform(image, mask, generator=_gen(seed))
    assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    assert set(torch.unique(out_mask).tolist()) <= {0, 1, 2}
    pixels, label_map = out_image[0].numpy() * 255, out_mask.numpy()
    for label, value in ((1, 120), (2, 240)):
        if (label_map == label).sum() < 20:
            continue  # the crop may cut a square away
        iou, distance = _alignment(pixels, label_map, label, value)
        assert iou > 0.85 and distance < 0.75, (seed, label, iou, distance)
        towards_centre = 2 if np.argwhere(label_map == label)[:, 1].mean() < 24 else -2
        _, shifted = _alignment(pixels, np.roll(label_map, towards_centre, axis=1), label, value)
        assert shifted > 1.5  # the check notices a 2-pixel misalignment


def test_segmentation_eval_resizes_both_without_crop():
    image, mask = _squares()
    out_image, out_mask = SegmentationTransform(32, train=False, normalize="none")(image, mask)
    np.testing.assert_array_equal(out_mask.numpy(), mask[::2, ::2])
    with pytest.raises(ValueError, match="mask shape"):
        SegmentationTransform(32)(image, mask[:10])


def _imageset(task: str, masks: bool = False) -> ImageSet:
    n = 6
    images = np.arange(n * 16 * 16, dtype=np.int64).reshape(n, 16, 16).astype(np.uint8)
    labels = {"multilabel": np.eye(n, 3, dtype=np.float32), "multiclass": np.arange(n) % 3, "none": None}[task]
    return ImageSet(images=images, labels=labels, label_names=[] if task == "none" else ["a", "b", "c"], task=task,
                    patient_ids=np.arange(n), masks=(images > 128).astype(np.uint8) if masks else None,
                    mask_names=["bright"] if masks else [])


def test_torch_image_dataset_targets_and_determinism():
    ds = _imageset("multilabel")
    transform = ClassificationTransform(12, train=True)
    a = TorchImageDataset(ds, indices=[1, 4], transform=transform, generator=_gen(3))
    b = TorchImageDataset(ds, indices=[1, 4], transform=transform, generator=_gen(3))
    assert len(a) == 2
    image, target = a[1]
    assert image.shape == (3, 12, 12) and target.tolist() == [0.0, 0.0, 0.0] and a[0][1].tolist() == [0, 1, 0]
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][0], a[0][0])
    a.set_epoch(1)
    assert not torch.equal(a[0][0], b[0][0])
    classes = TorchImageDataset(_imageset("multiclass"))
    image, target = classes[5]
    assert target.dtype == torch.long and int(target) == 2 and image.shape == (3, 16, 16) and image.max() <= 1
    unlabelled = TorchImageDataset(_imageset("none"), indices=[4])
    assert int(unlabelled[0][1]) == 4
    loader = torch.utils.data.DataLoader(a, batch_size=2)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 12, 12) and targets.shape == (2, 3)


def test_torch_image_dataset_with_masks():
    ds = _imageset("none", masks=True)
    dataset = TorchImageDataset(ds, transform=SegmentationTransform(8, train=False, normalize="none"),
                                with_masks=True)
    image, mask = dataset[2]
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8) and mask.dtype == torch.long
    with pytest.raises(ValueError, match="has no masks"):
        TorchImageDataset(_imageset("multiclass"), transform=SegmentationTransform(8), with_masks=True)
    with pytest.raises(ValueError, match="indices must lie in 0..5"):
        TorchImageDataset(ds, indices=[9])


@pytest.mark.gpu
def test_eval_transform_on_gpu_matches_cpu():
    images = np.random.default_rng(0).integers(0, 256, (8, 40, 40), dtype=np.uint8)
    transform = ClassificationTransform(32)
    cpu = transform(images)
    gpu = transform(images, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_torch_image_dataset_reads_memory_maps_without_sharing_them(tmp_path):
    np.save(tmp_path / "images.npy", np.full((3, 8, 8), 7, np.uint8))
    np.save(tmp_path / "labels.npy", np.eye(3, dtype=np.float32))
    ds = ImageSet(images=np.load(tmp_path / "images.npy", mmap_mode="r"),
                  labels=np.load(tmp_path / "labels.npy", mmap_mode="r"), label_names=["a", "b", "c"],
                  task="multilabel", patient_ids=[0, 1, 2])
    image, target = TorchImageDataset(ds)[1]
    assert float(image.max()) == pytest.approx(7 / 255) and target.tolist() == [0, 1, 0]
    assert not np.shares_memory(target.numpy(), ds.labels)  # a private copy, never a view of the cache file


def test_classification_photometric_jitter_is_seeded_bounded_and_train_only():
    images = np.full((4, 16, 16), 100, dtype=np.uint8)
    images[:, :, 8:] = 200
    jitter = ClassificationTransform(16, train=True, scale=None, hflip=0.0, photometric=0.4, normalize="none")
    a = jitter(images, generator=torch.Generator().manual_seed(0))
    b = jitter(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    plain = ClassificationTransform(16, train=True, scale=None, hflip=0.0, normalize="none")(images)
    assert not torch.allclose(a, plain)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # brightness x f then contrast about the grey mean: the left/right step scales by f_b * f_c, both in [0.6, 1.4]
    step = (a[:, 0, 8, 12] - a[:, 0, 8, 3]) / (plain[:, 0, 8, 12] - plain[:, 0, 8, 3])
    assert torch.all(step > 0.6**2 - 1e-4) and torch.all(step < 1.4**2 + 1e-4) and step.std() > 0
    off = ClassificationTransform(16, train=False, photometric=0.4, normalize="none")(images)
    torch.testing.assert_close(off, ClassificationTransform(16, train=False, normalize="none")(images))
    with pytest.raises(ValueError, match="photometric"):
        ClassificationTransform(16, train=True, photometric=1.5)
