"""The data file and overrides: parsing, validation before compute, close matches, provenance, the template."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from medlib import datafile
from medlib.config import get_profile, notebook_profile
from medlib.datafile import DATA_KEYS, DataFileError, read_data_file, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def settings_env(monkeypatch, tmp_path):
    """Set $MEDLIB_DATA_FILE / $MEDLIB_OVERRIDES for one test (and no stray weights folder)."""
    monkeypatch.delenv("MEDLIB_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("MEDLIB_NOTEBOOK", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))

    def use(path: Path | None = None, overrides: str | None = None) -> None:
        if path is not None:
            monkeypatch.setenv(datafile.DATA_FILE_ENV, str(path))
        if overrides is not None:
            monkeypatch.setenv(datafile.OVERRIDES_ENV, overrides)

    return use


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my_data.toml"
    path.write_text(text)
    return path


def test_template_names_every_key_a_notebook_reads_and_parses():
    raw = tomllib.loads((ROOT / "data.example.toml").read_text())
    assert set(raw["sources"]) == set(DATA_KEYS)
    settings = read_data_file(ROOT / "data.example.toml")
    assert settings.problems == () and settings.profile == "paper"
    assert settings.sources["chestxray14"].startswith("folder:/data/nih?")  # relative paths under root
    assert "root=/data/medmnist" in settings.sources["organ_ct"]


def test_overrides_from_the_command_line_are_typed_and_applied(settings_env):
    settings_env(overrides="eval.finetune_epochs=1 backbone.compare=dinov2-vit-s14,resnet50-in1k "
                           "eval.probe_lrs=0.1,0.01 diffusion.fid=false eval.cv_ssl_steps_fraction=0.5")
    p = get_profile("paper")
    assert p.eval.finetune_epochs == 1 and p.backbone.compare == ("dinov2-vit-s14", "resnet50-in1k")
    assert p.eval.probe_lrs == (0.1, 0.01) and p.diffusion.fid is False and p.eval.cv_ssl_steps_fraction == 0.5
    assert get_profile("paper") is p  # applied once per settings


def test_unknown_override_and_bad_value_are_reported_together_with_close_matches(settings_env):
    settings_env(overrides="eval.finetune_epoch=1 eval.folds=many")
    with pytest.raises(DataFileError) as err:
        validate("smoke", check_weights=False)
    msg = str(err.value)
    assert "2 problems" in msg and "did you mean 'eval.finetune_epochs'" in msg and "expected an integer" in msg


def test_paper_without_a_source_is_an_error_listing_every_missing_key(settings_env):
    with pytest.raises(DataFileError) as err:
        validate("paper", ["01", "02"], check_weights=False)
    msg = str(err.value)
    for key in ("cxr_multilabel", "organ_ct", "knee_mri", "cxr_segmentation", "ct_segmentation", "vindr_cxr",
                "mimic_cxr", "padchest", "chestxray14", "chexpert"):
        assert repr(key) in msg, key
    assert "allow_phantom" in msg


def test_notebook_04_reads_a_labelled_and_a_masked_chest_key(settings_env, tmp_path):
    p = get_profile("paper")
    assert datafile.notebook_keys(p, "04") == ["cxr_multilabel", "cxr_segmentation"]
    assert "04" in DATA_KEYS["cxr_segmentation"].notebooks
    for smaller in ("smoke", "tiny"):  # embedded profiles: the site-0 phantoms carry labels and masks
        assert datafile.notebook_keys(get_profile(smaller), "04") == []
    (tmp_path / "medmnist").mkdir()
    path = _write(tmp_path, '[sources]\ncxr_multilabel = "medmnist:chestmnist?size=64&root=medmnist"\n')
    settings_env(path)
    with pytest.raises(DataFileError) as err:
        validate("paper", ["04"], check_weights=False)
    msg = str(err.value)
    assert "notebook 04: data key 'cxr_segmentation'" in msg and "segfolder:" in msg


def test_allowed_phantom_passes_and_is_named_everywhere(settings_env, tmp_path):
    settings_env(_write(tmp_path, 'allow_phantom = true\n'))
    validate("paper", ["01"], check_weights=False)
    p = get_profile("paper")
    assert "knee_mri" in datafile.phantom_stand_ins(p, ["01"])
    assert any("PHANTOM STAND-IN" in line for line in datafile.sources_markdown(p))
    from medlib.reporting import provenance

    record = provenance(profile="paper")
    assert record["data_file"].endswith("my_data.toml") and "knee_mri" in record["phantom_stand_ins"]


def test_data_file_problems_are_collected_in_one_report(settings_env, tmp_path):
    path = _write(tmp_path, '''
weight_dir = "w"
allow_phantom = ["knee_mr"]
[sources]
chestxray_14 = "folder:nih"
chestxray14 = "folder:nih?labels=Data_Entry_2017.csv"
chexpert = "phantom:cxr?site=4"
padchest = "folderr:padchest"
[overrides]
"eval.init_sites" = [2, 3, 4]
"eval.init_images" = [40, 40, 40]
"eval.finetune_epoch" = 1
''')
    settings_env(path)
    with pytest.raises(DataFileError) as err:
        validate("paper", ["02"], check_weights=False)
    msg = str(err.value)
    assert "unknown key 'weight_dir'" in msg and "did you mean 'weights_dir'" in msg
    assert "'chestxray_14' is read by no notebook" in msg and "did you mean 'chestxray14'" in msg
    assert "'knee_mr'" in msg and "did you mean 'knee_mri'" in msg
    assert str(tmp_path / "nih") in msg  # the folder that does not exist
    assert "generated stand-in" in msg and "did you mean 'folder'" in msg
    assert "did you mean 'eval.finetune_epochs'" in msg


def test_a_valid_data_file_reaches_the_studies_and_provenance(settings_env, tmp_path):
    (tmp_path / "medmnist").mkdir()
    np.savez(tmp_path / "medmnist" / "breastmnist_64.npz", train_images=np.zeros((2, 64, 64), np.uint8))
    path = _write(tmp_path, 'medmnist_root = "medmnist"\n[sources]\nbreast_us = "medmnist:breastmnist?size=64"\n'
                            '[overrides]\n"eval.folds" = 3\n')
    settings_env(path, "eval.bootstrap=10")
    p = get_profile("smoke")
    assert p.data.sources["breast_us"] == f"medmnist:breastmnist?size=64&root={tmp_path}/medmnist"
    assert (p.eval.folds, p.eval.bootstrap) == (3, 10)
    validate("smoke", check_weights=False)
    from medlib.reporting import provenance

    record = provenance(profile="smoke")
    assert record["overrides"] == {"eval.folds": "3", "eval.bootstrap": "10"}
    assert record["data_sources"]["breast_us"].startswith("medmnist:breastmnist")


def test_validation_is_per_notebook(settings_env):
    with pytest.raises(DataFileError, match="vindr_cxr"):
        datafile.validate("paper", ["02_imagenet_vs_ssl_init"])
    datafile.validate("paper", ["00_datasets"])  # the data tour reads no key
    assert notebook_profile("paper").name == "paper"  # the kernel applies the settings; reproduce validated


def test_init_site_keys_match_study_2():
    from medlib.studies.imagenet_vs_ssl_init import INIT_SITES

    assert {s: c.source_key for s, c in INIT_SITES.items()} == dict(datafile.INIT_SITE_KEYS)


def test_reproduce_stops_before_running_anything(settings_env, tmp_path, monkeypatch, capsys):
    from medlib import reproduce

    monkeypatch.setenv("MEDLIB_REPORTS", str(tmp_path / "reports"))
    path = _write(tmp_path, '[sources]\nchestxray14 = "folder:nowhere"\n')
    assert reproduce.main(["--profile", "paper", "--data", str(path), "--only", "02",
                           "--override", "eval.init_sites=3 eval.init_images=40"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "reports" / "paper" / "runs.json").exists()
