"""Tests of medlib.data.sources: spec parsing, registry, MedMNIST+, DICOM, CSV / mask / RadImageNet folders."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlib.data import sources
from medlib.data.imageset import ImageSet
from medlib.data.sources import DataError, fit_image, load_source, parse_spec, read_dicom, to_uint8

pydicom = pytest.importorskip("pydicom")


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_testdata_file(name)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------- specs and registry


def test_parse_spec_converts_values_and_keeps_spaces():
    scheme, path, params = parse_spec("folder:/data/nih?labels=a.csv&image_col=Image Index&size=224"
                                      "&low=0.5&merge=true&label_cols=A,B&sep=%7C")
    assert scheme == "folder" and path == "/data/nih"
    assert params == {"labels": "a.csv", "image_col": "Image Index", "size": 224, "low": 0.5, "merge": True,
                      "label_cols": "A,B", "sep": "|"}
    assert parse_spec("phantom:cxr?site=2&n=500&size=128&seed=0") == (
        "phantom", "cxr", {"site": 2, "n": 500, "size": 128, "seed": 0})
    assert parse_spec("natural:") == ("natural", "", {})


@pytest.mark.parametrize("spec, message", [
    ("no-scheme-here", "no scheme"),
    ("folder:/x?size", "key=value"),
    ("folder:/x?size=1&size=2", "given twice"),
])
def test_parse_spec_rejects_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


def test_unknown_scheme_lists_registered_schemes():
    with pytest.raises(DataError, match="registered schemes: .*dicom.*medmnist"):
        load_source("nosuch:/x")


def test_unknown_parameter_lists_accepted_ones(tmp_path):
    with pytest.raises(DataError, match="unknown parameter.*colour.*takes.*size"):
        load_source(f"radimagenet:{tmp_path}?colour=red")


def test_register_source_adds_a_scheme(monkeypatch):
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))

    @sources.register_source("ones")
    def _ones(path, *, cache=True, n=2):
        return ImageSet(images=np.ones((n, 4, 4), np.uint8), labels=None, label_names=[], task="none",
                        patient_ids=np.arange(n))

    ds = load_source("ones:?n=3")
    assert len(ds) == 3 and ds.meta["source"] == "ones:?n=3"
    assert "ones" in sources.registered_schemes()
    with pytest.raises(ValueError, match="lower-case"):
        sources.register_source("Bad Name")


# --------------------------------------------------------------------------- intensity and geometry


def test_to_uint8_known_values():
    x = np.array([0.0, 50.0, 100.0])
    assert to_uint8(x).tolist() == [0, 128, 255]
    assert to_uint8(x, "window", center=50, width=50).tolist() == [0, 128, 255]
    assert to_uint8(np.array([-1050.0, -600.0, -450.0, 500.0]), "window", center=-600, width=1500).tolist() == [51, 128, 153, 255]
    ramp = np.arange(1001, dtype=np.float64)
    out = to_uint8(ramp, "percentile", low=10, high=90)
    assert out[100] == 0 and out[900] == 255 and out[500] == 128 and out[0] == 0 and out[-1] == 255
    assert to_uint8(np.full((3, 3), 7.0)).tolist() == np.zeros((3, 3), np.uint8).tolist()
    assert to_uint8(np.array([0, 65535], dtype=np.uint16)).tolist() == [0, 255]


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "gamma"}, "unknown policy"),
    ({"policy": "window"}, "needs center"),
    ({"policy": "percentile", "low": 60, "high": 40}, "low < high"),
])
def test_to_uint8_rejects_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        to_uint8(np.arange(4.0), **kwargs)


def test_to_uint8_rejects_nan():
    with pytest.raises(DataError, match="NaN"):
        to_uint8(np.array([0.0, np.nan]))


def test_fit_image_pads_and_crops_around_the_centre():
    image = np.full((40, 24), 200, np.uint8)  # scaled to 10 x 6, padded by 2 columns each side
    padded = fit_image(image, 10, "pad")
    assert padded.shape == (10, 10)
    assert (padded[:, :2] == 0).all() and (padded[:, 2:8] == 200).all() and (padded[:, 8:] == 0).all()
    tall = np.zeros((40, 20), np.uint8)
    tall[:6] = 255  # a band at the top is cut off by the centre crop
    cropped = fit_image(tall, 10, "crop")
    assert cropped.shape == (10, 10) and (cropped == 0).all()
    with pytest.raises(DataError, match="fit must be"):
        fit_image(image, 10, "stretch")


# --------------------------------------------------------------------------- MedMNIST+


def _write_medmnist(root: Path, flag: str, size: int, counts=(6, 2, 3), n_labels=1, n_classes=2,
                    keys=None, label_override=None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        if n_labels == 1:
            arrays[f"{split}_labels"] = rng.integers(0, n_classes, (n, 1)).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, n_labels)).astype(np.uint8)
    if label_override is not None:
        arrays["test_labels"][-1, 0] = label_override
    if keys is not None:
        arrays = {k: v for k, v in zip(keys, arrays.values())}
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_breast_keeps_official_split_and_flips_to_malignant(tmp_path):
    path = _write_medmnist(tmp_path, "breastmnist", 28)
    raw = np.load(path)
    ds = load_source(f"medmnist:breastmnist?root={tmp_path}")
    assert ds.images.shape == (11, 28, 28) and isinstance(ds.images, np.memmap)
    assert ds.task == "binary" and ds.label_names == ["malignant"]
    official = np.concatenate([raw["train_labels"], raw["val_labels"], raw["test_labels"]])[:, 0]
    np.testing.assert_array_equal(ds.labels[:, 0], 1 - official)  # official 0 = malignant
    np.testing.assert_array_equal(ds.images[6:8], raw["val_images"])
    assert ds.meta["split"].tolist() == ["train"] * 6 + ["val"] * 2 + ["test"] * 3
    assert "patient" in ds.meta["patient_id_note"] and len(set(ds.patient_ids)) == 11
    test = load_source(f"medmnist:breastmnist?root={tmp_path}", split="test")
    np.testing.assert_array_equal(test.images, raw["test_images"])
    assert len(test) == 3 and isinstance(test.images, np.memmap)
    kept = load_source(f"medmnist:breastmnist?root={tmp_path}&positive=benign_or_normal", cache=False)
    np.testing.assert_array_equal(kept.labels[:, 0], official)
    assert kept.label_names == ["benign_or_normal"]


def test_medmnist_chest_is_multilabel_with_nih_names_and_organ_is_multiclass(tmp_path):
    _write_medmnist(tmp_path, "chestmnist", 64, n_labels=14)
    chest = load_source(f"medmnist:chestmnist?size=64&root={tmp_path}")
    assert chest.task == "multilabel" and chest.labels.shape == (11, 14)
    assert chest.label_names[0] == "Atelectasis" and "Pleural_Thickening" in chest.label_names
    _write_medmnist(tmp_path, "organamnist", 28, n_classes=11)
    organ = load_source(f"medmnist:organamnist?root={tmp_path}", split="val")
    assert organ.task == "multiclass" and organ.labels.dtype == np.int64 and organ.n_classes == 11


def test_medmnist_bad_files_raise_clear_errors(tmp_path):
    _write_medmnist(tmp_path / "a", "breastmnist", 28, keys=["x_img", "x_lab", "val_images", "val_labels",
                                                             "test_images", "test_labels"])
    with pytest.raises(DataError, match="breastmnist.npz: not a MedMNIST\\+ file.*train_images"):
        load_source(f"medmnist:breastmnist?root={tmp_path / 'a'}")
    _write_medmnist(tmp_path / "b", "organamnist", 28, n_classes=11, label_override=11)
    with pytest.raises(DataError, match="test_labels row 2 holds class 11, outside the declared 0..10"):
        load_source(f"medmnist:organamnist?root={tmp_path / 'b'}")
    with pytest.raises(DataError, match="pneumoniamnist_128.npz: MedMNIST\\+ file not found.*download=True"):
        load_source(f"medmnist:pneumoniamnist?size=128&root={tmp_path}")
    with pytest.raises(DataError, match="size must be one of"):
        load_source(f"medmnist:pneumoniamnist?size=100&root={tmp_path}")
    _write_medmnist(tmp_path / "c", "breastmnist", 28)
    with pytest.raises(DataError, match="split 'holdout' is empty; available splits: test, train, val"):
        load_source(f"medmnist:breastmnist?root={tmp_path / 'c'}", split="holdout")


# --------------------------------------------------------------------------- DICOM


def test_dicom_chest_radiograph_is_windowed_and_monochrome1_inverted():
    path = _testdata("RG1_UNCR.dcm")
    frames, info = read_dicom(path)
    raw = pydicom.dcmread(path)
    assert raw.PhotometricInterpretation == "MONOCHROME1" and raw.BitsAllocated == 16
    assert frames.shape == (1, 1955, 1841) and frames.dtype == np.uint8
    expected = 255 - to_uint8(raw.pixel_array, "window", center=15000, width=30000)
    np.testing.assert_array_equal(frames[0], expected)
    assert info["window"] == "dicom:15000,30000" and info["modality"] == "CR"
    ds = load_source(f"dicom:{path}?size=64")
    assert ds.images.shape == (1, 64, 64) and ds.task == "none"
    assert int(ds.images.max()) <= 255 and ds.images.std() > 10


def test_dicom_ct_uses_hounsfield_units_for_named_windows():
    path = _testdata("CT_small.dcm")
    raw = pydicom.dcmread(path)
    hu = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    frames, info = read_dicom(path, window="lung")
    np.testing.assert_array_equal(frames[0], to_uint8(hu, "window", center=-600, width=1500))
    assert info["window"] == "lung:-600,1500"
    frames, info = read_dicom(path)  # no window in the file: 0.5 / 99.5 percentiles
    assert info["window"] == "percentile:0.5,99.5" and frames.min() == 0 and frames.max() == 255
    explicit, _ = read_dicom(path, window="40,400")
    np.testing.assert_array_equal(explicit, read_dicom(path, window="abdomen")[0])
    with pytest.raises(DataError, match="Unknown window 'liver'"):
        read_dicom(path, window="liver")
    with pytest.raises(DataError, match="window=dicom but the file has no WindowCenter"):
        read_dicom(path, window="dicom")


def test_dicom_mr_ultrasound_and_multiframe():
    mr, info = read_dicom(_testdata("MR_small.dcm"))
    assert mr.shape == (1, 64, 64) and info["photometric"] == "MONOCHROME2"
    us_path = _testdata("US1_UNCR.dcm")
    us, info = read_dicom(us_path)
    rgb = pydicom.dcmread(us_path).pixel_array.astype(np.float64)
    assert us.shape == (1, 480, 640) and info["photometric"] == "RGB"
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    assert np.abs(us[0].astype(int) - luma).max() <= 1
    multi_path = _testdata("emri_small.dcm")
    assert read_dicom(multi_path)[0].shape == (10, 64, 64)
    middle, info = read_dicom(multi_path, frames="middle")
    assert middle.shape == (1, 64, 64) and info["frames"] == [5]
    np.testing.assert_array_equal(middle[0], read_dicom(multi_path, frames=5)[0][0])
    with pytest.raises(DataError, match="frame 12 requested but the file has 10"):
        read_dicom(multi_path, frames=12)
    ds = load_source(f"dicom:{multi_path}?frames=all&size=32", cache=False)
    assert ds.images.shape == (10, 32, 32) and ds.meta["frame"].tolist() == list(range(10))
    assert len(set(ds.patient_ids)) == 1


def test_dicom_folder_never_leaks_identifiers(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        shutil.copy(_testdata(name), tmp_path / "sub" / name)
    ds = load_source(f"dicom:{tmp_path}?size=48&window=minmax")
    assert ds.images.shape == (3, 48, 48) and ds.meta["file"].tolist() == [
        "sub/CT_small.dcm", "sub/MR_small.dcm", "sub/RG1_UNCR.dcm"]
    headers = [pydicom.dcmread(_testdata(n)) for n in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm")]
    expected = [hashlib.sha256(f"medlib|{h.PatientID}".encode()).hexdigest()[:12] for h in headers]
    assert ds.patient_ids.tolist() == expected
    text = repr(ds.meta) + repr(ds.patient_ids.tolist())
    for header in headers:
        for value in (str(header.PatientName), str(header.PatientID), str(header.get("PatientBirthDate", "")),
                      str(header.StudyInstanceUID)):
            if value:
                assert value not in text
    assert not any("name" in key.lower() or "birth" in key.lower() for key in ds.meta)
    salted = load_source(f"dicom:{tmp_path}?size=48&window=minmax&salt=other", cache=False)
    assert not set(salted.patient_ids) & set(ds.patient_ids)
    by_study = load_source(f"dicom:{tmp_path}?size=48&group=study", cache=False)
    assert not set(by_study.patient_ids) & set(ds.patient_ids)


def test_dicom_bad_inputs_name_the_file(tmp_path):
    shutil.copy(_testdata("CT_small.dcm"), tmp_path / "a.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt: not a readable DICOM file.*glob="):
        load_source(f"dicom:{tmp_path}?size=32")
    assert len(load_source(f"dicom:{tmp_path}?size=32&glob=*.dcm")) == 1
    shutil.copy(_testdata("MR_small.dcm"), tmp_path / "b.dcm")
    with pytest.raises(DataError, match="b.dcm: image size .* differs .*pass size=S"):
        load_source(f"dicom:{tmp_path}?glob=*.dcm", cache=False)
    with pytest.raises(DataError, match="no such DICOM file or folder"):
        load_source(f"dicom:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="notes.txt: not a readable DICOM"):
        read_dicom(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- image folders + CSV


def _nih_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(5):
        _png(root / "images" / f"{i:03d}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    (root / "Data_Entry.csv").write_text(
        "Image Index,Finding Labels,Patient ID,split\n"
        "000.png,No Finding,p1,train\n"
        "001.png,Effusion|Mass,p1,train\n"
        "002.png,Mass,p2,val\n"
        "003.png,Effusion,p3,test\n"
        "004.png,No Finding,p3,test\n")
    return root


def test_folder_nih_style_findings(tmp_path):
    root = _nih_folder(tmp_path)
    spec = (f"folder:{root}?labels=Data_Entry.csv&image_col=Image Index&finding_col=Finding Labels"
            f"&patient_col=Patient ID&image_dir=images&size=16&split_col=split")
    ds = load_source(spec)
    assert ds.task == "multilabel" and ds.label_names == ["Effusion", "Mass"]
    assert ds.labels.tolist() == [[0, 0], [1, 1], [0, 1], [1, 0], [0, 0]]
    assert ds.patient_ids.tolist() == ["p1", "p1", "p2", "p3", "p3"]
    assert ds.images.shape == (5, 16, 16) and isinstance(ds.images, np.memmap)
    assert len(load_source(spec, split="test")) == 2
    declared = load_source(spec + "&classes=Mass,Effusion,Hernia", cache=False)
    assert declared.label_names == ["Mass", "Effusion", "Hernia"] and declared.labels[1].tolist() == [1, 1, 0]
    with pytest.raises(DataError, match="row 3 has finding 'Effusion', outside the declared classes.*others=ignore"):
        load_source(spec + "&classes=Mass", cache=False)
    only_mass = load_source(spec + "&classes=Mass&others=ignore", cache=False)
    assert only_mass.labels[:, 0].tolist() == [0, 1, 1, 0, 0]


def test_folder_chexpert_style_uncertainty_and_filters(tmp_path):
    root = tmp_path
    for i in range(4):
        _png(root / "CheXpert" / f"patient{i // 2:05d}" / f"view{i}.png", np.full((8, 8), 40 * i, np.uint8))
    (root / "CheXpert" / "train.csv").write_text(
        "Path,Frontal/Lateral,Edema,Cardiomegaly\n"
        "CheXpert/patient00000/view0.png,Frontal,1.0,\n"
        "CheXpert/patient00000/view1.png,Lateral,0.0,1.0\n"
        "CheXpert/patient00001/view2.png,Frontal,-1.0,0.0\n"
        "CheXpert/patient00001/view3.png,Frontal,,1.0\n")
    base = (f"folder:{root}?labels=CheXpert/train.csv&image_col=Path&label_cols=Edema,Cardiomegaly"
            f"&patient_regex=(patient\\d+)")
    with pytest.raises(DataError, match="train.csv: row 4 column 'Edema' is -1 \\(uncertain\\).*u=zeros or u=ones"):
        load_source(base, cache=False)
    ones = load_source(base + "&u=ones&where=Frontal/Lateral==Frontal", cache=False)
    assert ones.labels.tolist() == [[1, 0], [1, 0], [0, 1]]
    assert ones.patient_ids.tolist() == ["patient00000", "patient00001", "patient00001"]
    assert ones.images[:, 0, 0].tolist() == [0, 80, 120]
    zeros = load_source(base + "&u=zeros", cache=False)
    assert zeros.labels[2].tolist() == [0, 0]
    binary = load_source(base.replace("label_cols=Edema,Cardiomegaly", "label_cols=Edema") + "&u=zeros", cache=False)
    assert binary.task == "binary" and binary.labels.shape == (4, 1)


def test_folder_bad_inputs_name_the_row_or_file(tmp_path):
    root = _nih_folder(tmp_path)
    base = f"folder:{root}?labels=Data_Entry.csv&image_col=Image Index&image_dir=images"
    with pytest.raises(DataError, match="finding column\\(s\\) \\['Findings'\\] not found.*Finding Labels"):
        load_source(base + "&finding_col=Findings", cache=False)
    with pytest.raises(DataError, match="exactly one of label_cols"):
        load_source(base, cache=False)
    (root / "bad.csv").write_text("Image Index,Mass\n000.png,1\n001.png,2\n")
    with pytest.raises(DataError, match="bad.csv: row 3 column 'Mass' holds 2"):
        load_source(f"folder:{root}?labels=bad.csv&image_dir=images&label_cols=Mass", cache=False)
    (root / "text.csv").write_text("Image Index,Mass\n000.png,yes\n")
    with pytest.raises(DataError, match="text.csv: row 2 column 'Mass' holds 'yes', not a number"):
        load_source(f"folder:{root}?labels=text.csv&image_dir=images&label_cols=Mass", cache=False)
    (root / "missing.csv").write_text("Image Index,Mass\n000.png,1\n999.png,0\n")
    with pytest.raises(DataError, match="missing.csv: row 3 names image .*999.png, which does not exist"):
        load_source(f"folder:{root}?labels=missing.csv&image_dir=images&label_cols=Mass", cache=False)
    (root / "images" / "003.png").write_bytes(b"garbage, not a png")
    with pytest.raises(DataError, match="003.png: not a readable image"):
        load_source(base + "&finding_col=Finding Labels", cache=False)
    with pytest.raises(DataError, match="label CSV not found"):
        load_source(f"folder:{root}?labels=nope.csv&label_cols=Mass", cache=False)


def test_folder_multiclass_duplicates_and_16bit(tmp_path):
    root = tmp_path
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(wide).save(root / "a.png")  # 16-bit grey PNG
    _png(root / "b.png", np.full((8, 8), 9, np.uint8))
    _png(root / "c.png", np.full((8, 8, 3), (255, 0, 0), np.uint8))  # RGB -> luma 76
    (root / "classes.csv").write_text("file,kind\na.png,cyst\nb.png,solid\nc.png,cyst\n")
    ds = load_source(f"folder:{root}?labels=classes.csv&class_col=kind", cache=False)
    assert ds.task == "multiclass" and ds.label_names == ["cyst", "solid"] and ds.labels.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(ds.images[0], np.rint(np.arange(64) / 63 * 255).reshape(8, 8))  # min-max
    assert ds.images[2, 0, 0] == 76
    with pytest.raises(DataError, match="classes.csv: row 2 has class 'cyst', outside the declared classes"):
        load_source(f"folder:{root}?labels=classes.csv&class_col=kind&classes=solid,fluid", cache=False)
    (root / "readers.csv").write_text("file,rad,Mass,Nodule\na.png,R1,1,0\na.png,R2,0,1\nb.png,R1,0,0\n")
    with pytest.raises(DataError, match="rows \\[2, 3\\] name the same image 'a.png'.*aggregate=max"):
        load_source(f"folder:{root}?labels=readers.csv&label_cols=Mass,Nodule", cache=False)
    merged = load_source(f"folder:{root}?labels=readers.csv&label_cols=Mass,Nodule&aggregate=max", cache=False)
    assert merged.labels.tolist() == [[1, 1], [0, 0]] and merged.meta["file"].tolist() == ["a.png", "b.png"]
    first = load_source(f"folder:{root}?labels=readers.csv&label_cols=Mass,Nodule&aggregate=first", cache=False)
    assert first.labels.tolist() == [[1, 0], [0, 0]]
    unlabelled = load_source(f"folder:{root}")
    assert unlabelled.task == "none" and len(unlabelled) == 3


# --------------------------------------------------------------------------- image + mask folders


def _seg_folder(root: Path) -> None:
    for i in range(3):
        image = np.full((30, 20), 50, np.uint8)
        left = np.zeros((30, 20), np.uint8)
        right = np.zeros((30, 20), np.uint8)
        left[5:25, 2:8] = 255
        right[5:25, 12:18] = 255
        image[left > 0] = 200
        _png(root / "images" / f"case{i}.png", image)
        _png(root / "masks" / "left" / f"case{i}_mask.png", left)
        if i < 2:
            _png(root / "masks" / "right" / f"case{i}_mask.png", right)


def test_segfolder_matches_masks_by_stem(tmp_path):
    _seg_folder(tmp_path)
    spec = f"segfolder:{tmp_path / 'images'}?masks=masks/left,masks/right&mask_suffix=_mask&size=30&missing=skip"
    ds = load_source(spec)
    assert len(ds) == 2 and ds.mask_names == ["left", "right"] and set(np.unique(ds.masks)) == {0, 1, 2}
    assert ds.masks.shape == ds.images.shape == (2, 30, 30)
    assert (ds.images[ds.masks == 1] == 200).all() and (ds.images[ds.masks == 2] == 50).all()
    merged = load_source(spec + "&merge=true&mask_names=lung", cache=False)
    assert merged.mask_names == ["lung"] and set(np.unique(merged.masks)) == {0, 1}
    assert (merged.masks > 0).sum() == (ds.masks > 0).sum()
    with pytest.raises(DataError, match="case2.png: no mask named case2_mask.* in .*right.*missing=skip"):
        load_source(spec.replace("&missing=skip", ""), cache=False)


def test_segfolder_mask_of_the_wrong_size_raises(tmp_path):
    _png(tmp_path / "img" / "a.png", np.zeros((16, 16), np.uint8))
    _png(tmp_path / "msk" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="a.png: mask size \\(8, 8\\) differs from its image .*\\(16, 16\\)"):
        load_source(f"segfolder:{tmp_path / 'img'}?masks=msk", cache=False)
    with pytest.raises(DataError, match="mask folder not found"):
        load_source(f"segfolder:{tmp_path / 'img'}?masks=nowhere", cache=False)


# --------------------------------------------------------------------------- RadImageNet


def test_radimagenet_layout(tmp_path):
    for label, value in (("thyroid_nodule", 220), ("normal", 30)):
        for i in range(3):
            _png(tmp_path / "US" / "thyroid" / label / f"{label}{i}.png", np.full((12, 10), value, np.uint8))
    _png(tmp_path / "MR" / "knee" / "acl" / "k0.png", np.zeros((12, 10), np.uint8))
    ds = load_source(f"radimagenet:{tmp_path}?modality=us&anatomy=thyroid&size=8")
    assert ds.task == "multiclass" and ds.label_names == ["normal", "thyroid_nodule"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.images.shape == (6, 8, 8)
    binary = load_source(f"radimagenet:{tmp_path}?modality=US&anatomy=thyroid&positive=thyroid_nodule&size=8",
                         cache=False)
    assert binary.task == "binary" and binary.labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    everything = load_source(f"radimagenet:{tmp_path}?size=8", cache=False)
    assert everything.label_names == ["MR/knee/acl", "US/thyroid/normal", "US/thyroid/thyroid_nodule"]
    with pytest.raises(DataError, match="no modality folder 'CT'; available: \\['MR', 'US'\\]"):
        load_source(f"radimagenet:{tmp_path}?modality=CT", cache=False)


# --------------------------------------------------------------------------- embedded sources


def test_phantom_scheme_calls_the_phantom_generator():
    phantoms = pytest.importorskip("medlib.data.phantoms")
    if not hasattr(phantoms, "make_dataset"):
        pytest.skip("medlib.data.phantoms.make_dataset is not written yet")
    ds = load_source("phantom:cxr?n=4&size=64&seed=0")
    assert isinstance(ds, ImageSet) and len(ds) == 4 and ds.images.shape[1:3] == (64, 64)
    assert ds.masks is not None and ds.patient_ids.shape == (4,)
    with pytest.raises(DataError, match="give the number of images"):
        load_source("phantom:cxr?size=64")


def test_medmnist_streaming_copies_in_chunks(tmp_path):
    import zipfile

    path = _write_medmnist(tmp_path, "pneumoniamnist", 28, counts=(11, 2, 3))
    out = np.zeros((11, 28, 28), np.uint8)
    with zipfile.ZipFile(path) as zf:
        sources._stream_npz_array(zf, "train_images", out, chunk_rows=4)
    np.testing.assert_array_equal(out, np.load(path)["train_images"])


def test_folder_image_dir_glob_finds_files_by_name(tmp_path):
    _png(tmp_path / "images_001" / "images" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "images_002" / "images" / "b.png", np.full((8, 8), 255, np.uint8))
    (tmp_path / "entries.csv").write_text("Image Index,Finding Labels\na.png,No Finding\nb.png,Hernia\n")
    ds = load_source(f"folder:{tmp_path}?labels=entries.csv&finding_col=Finding Labels&image_dir=images_*/images&workers=2",
                     cache=False)
    assert ds.images[:, 0, 0].tolist() == [0, 255] and ds.labels.tolist() == [[0], [1]]


def test_csv_scheme_is_folder_rooted_at_the_csv(tmp_path):
    root = _nih_folder(tmp_path)
    ds = load_source(f"csv:{root / 'Data_Entry.csv'}?image_col=Image Index&finding_col=Finding Labels"
                     f"&image_dir=images", cache=False)
    assert ds.label_names == ["Effusion", "Mass"] and len(ds) == 5
    with pytest.raises(DataError, match="csv: unknown parameter\\(s\\) colour"):
        load_source(f"csv:{root / 'Data_Entry.csv'}?colour=1")
    with pytest.raises(DataError, match="with class_col= use aggregate=first"):
        load_source(f"csv:{root / 'Data_Entry.csv'}?class_col=Patient ID&aggregate=max&image_dir=images")


def test_natural_scheme_calls_the_natural_generator():
    pytest.importorskip("medlib.data.natural")
    ds = load_source("natural:?n=4&size=64&seed=0")
    assert isinstance(ds, ImageSet) and len(ds) == 4 and ds.images.shape[1:3] == (64, 64)
    labelled = load_source("natural:labelled?n=4&size=64&seed=0")
    assert labelled.task != "none" and len(labelled) == 4
    with pytest.raises(DataError, match="unknown kind"):
        load_source("natural:cats?n=4")
