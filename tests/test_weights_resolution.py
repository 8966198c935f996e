"""Where weights are found: weights=, the weights folders (our and release names), the Hugging Face cache; never a retry."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from medlib import datafile
from medlib.models.backbones import (BACKBONES, WeightsNotFoundError, create_backbone, get_spec, locate_vae,
                                     locate_weights, release_names)


@pytest.fixture()
def clean(monkeypatch, tmp_path):
    """No weights folder, an empty Hugging Face cache, offline, no data file."""
    for var in ("MEDLIB_WEIGHTS_DIR", datafile.DATA_FILE_ENV, datafile.OVERRIDES_ENV, "MEDLIB_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _hub(cache: Path, repo: str, name: str, data: bytes) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_every_name_a_notebook_uses_is_registered():
    from medlib.config import _PROFILES

    for p in _PROFILES.values():
        names = {*p.backbone.compare, *p.eval.init_arms, p.eval.cv_imagenet_cnn, p.eval.cv_ssl_vit,
                 p.diffusion.encoder, p.diffusion.aug_classifier} | ({p.eval.cv_medical_cnn} - {""})
        for name in names:
            assert get_spec(name).name == name
    assert BACKBONES["vit-b16-mimic-cxr"].source == "local"


def test_release_names():
    assert release_names("dinov2-vit-s14") == ["dinov2_vits14_pretrain.pth"]
    assert release_names("dinov2-vit-b14-reg4") == ["dinov2_vitb14_reg4_pretrain.pth"]
    assert "resnet50_a1_0-14fe96d1.pth" in release_names("resnet50-in1k")
    assert "RadImageNet-ResNet50_notop.pth" in release_names("radimagenet-resnet50")


def test_original_release_name_in_the_data_files_weights_folder(clean, monkeypatch):
    weights = clean / "weights"
    weights.mkdir()
    state = timm.create_model("resnet50", pretrained=False).state_dict()
    torch.save(state, weights / "RadImageNet-ResNet50_notop.pth")
    (clean / "d.toml").write_text('weights_dir = "weights"\n')
    monkeypatch.setenv(datafile.DATA_FILE_ENV, str(clean / "d.toml"))
    found, _ = locate_weights("radimagenet-resnet50")
    assert found == weights / "RadImageNet-ResNet50_notop.pth"
    assert create_backbone("radimagenet-resnet50", image_size=32).weights_path == found


def test_hugging_face_cache_is_used_like_timm(clean):
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save

    link = _hub(clean / "hf", "timm/vit_small_patch14_reg4_dinov2.lvd142m", "model.safetensors", save(state))
    found, looked = locate_weights("dinov2-vit-s14-reg4")
    assert found == link and any("no weights folder" in x for x in looked)
    bb = create_backbone("dinov2-vit-s14-reg4", image_size=56)
    assert bb.num_register_tokens == 4 and bb.model.pos_embed.shape == (1, 16, 384)


def test_missing_weights_fail_at_once_listing_places(clean, monkeypatch):
    monkeypatch.setenv("MEDLIB_WEIGHTS_DIR", str(clean / "nowhere"))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("dinov2-vit-b14")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "nowhere (does not exist)" in msg and "Hugging Face cache" in msg and "dinov2_vitb14_pretrain.pth" in msg


def test_missing_weights_folder_is_reported_by_validation(clean, monkeypatch):
    (clean / "d.toml").write_text('weights_dir = "absent"\nallow_phantom = true\n')
    monkeypatch.setenv(datafile.DATA_FILE_ENV, str(clean / "d.toml"))
    with pytest.raises(datafile.DataFileError) as err:
        datafile.validate("paper", ["01"])
    msg = str(err.value)
    assert "absent does not exist" in msg and "weights of 'dinov2-vit-b14' not found" in msg


def test_vae_from_weights_folder_and_hub_cache_offline_without_retries(clean, monkeypatch):
    from diffusers import AutoencoderKL

    from medlib.diffusion.build import LDMNotBuiltError, load_pretrained_vae

    start = time.perf_counter()
    with pytest.raises(LDMNotBuiltError, match="looked at"):
        load_pretrained_vae("stabilityai/sd-vae-ft-mse", 64)
    assert time.perf_counter() - start < 10  # no hub retries
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(clean / "saved")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        _hub(clean / "hf", "stabilityai/sd-vae-ft-mse", name, (clean / "saved" / name).read_bytes())
    folder, _ = locate_vae("stabilityai/sd-vae-ft-mse")
    assert folder is not None and (folder / "config.json").is_file()
    assert load_pretrained_vae("stabilityai/sd-vae-ft-mse", 64).config.sample_size == 64
    weights = clean / "weights"
    vae.save_pretrained(weights / "sd-vae-ft-mse")
    monkeypatch.setenv("MEDLIB_WEIGHTS_DIR", str(weights))
    assert locate_vae("stabilityai/sd-vae-ft-mse")[0] == weights / "sd-vae-ft-mse"


def test_download_only_when_allowed_and_online(clean, monkeypatch):
    from medlib.models import backbones

    assert not backbones.download_allowed()
    monkeypatch.setenv("MEDLIB_ALLOW_DOWNLOAD", "1")
    assert not backbones.download_allowed()  # HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert backbones.download_allowed()
    calls = []

    def fake_download(repo, filename):
        calls.append((repo, filename))
        path = clean / "hf" / "downloaded.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.zeros(1)}, str(path))
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    found, _ = locate_weights("resnet50-in1k", download=True)
    assert calls == [("timm/resnet50.a1_in1k", "model.safetensors")] and found.name == "downloaded.safetensors"
