"""Tests for the procedural radiology phantoms (medlib.data.phantoms)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.measure import regionprops

from medlib.data.imageset import ImageSet
from medlib.data.phantoms import (FAMILIES, GENERATOR_VERSION, cxr, family_spec, generate_one, make_dataset,
                                  site_label_names)


def _cxr(index: int, size: int = 128, site: int = 0, **findings: int):
    """A chest phantom with some findings forced on or off."""
    return generate_one("cxr", index, size=size, site=site, findings=findings or None)


def _ctr_from_mask(mask: np.ndarray) -> float:
    """Heart width / widest lung-to-lung width, measured on the label map."""
    heart = np.where((mask == 3).any(axis=0))[0]
    lungs = np.where(np.isin(mask, (1, 2)).any(axis=0))[0]
    return (heart.max() - heart.min() + 1) / (lungs.max() - lungs.min() + 1)


# ---------------------------------------------------------------- API, validation, determinism

def test_families_and_version():
    assert FAMILIES == ("cxr", "ct", "knee", "breast_us", "thyroid_us")
    assert isinstance(GENERATOR_VERSION, str) and GENERATOR_VERSION


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_returns_a_valid_imageset(family):
    data = make_dataset(family, 6, size=64, cache=False)
    spec = family_spec(family)
    assert isinstance(data, ImageSet)
    assert data.images.shape == (6, 64, 64) and data.images.dtype == np.uint8
    assert data.masks.shape == (6, 64, 64) and data.masks.dtype == np.uint8
    assert data.masks.max() <= len(spec.mask_names)
    assert data.mask_names == list(spec.mask_names)
    assert data.task == spec.task
    assert data.label_names == site_label_names(family, 0)
    assert data.name == f"phantom:{family}?site=0"
    assert data.meta["site"].tolist() == [0] * 6
    assert data.images.std() > 10  # not blank
    if spec.task == "multiclass":
        assert data.labels.shape == (6,) and data.labels.dtype == np.int64
    else:
        assert data.labels.shape == (6, len(data.label_names)) and data.labels.dtype == np.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_do_not_depend_on_order_or_batch(family):
    forward = [generate_one(family, i, size=64, seed=3) for i in (4, 1, 7)]
    backward = [generate_one(family, i, size=64, seed=3) for i in (7, 1, 4)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.patient_id == b.patient_id
    batch = make_dataset(family, 8, size=64, seed=3, cache=False)
    np.testing.assert_array_equal(batch.images[7], forward[2].image)
    np.testing.assert_array_equal(batch.images[1], forward[1].image)
    other_seed = generate_one(family, 4, size=64, seed=4)
    assert not np.array_equal(other_seed.image, forward[0].image)


def test_worker_processes_give_the_same_data():
    one = make_dataset("cxr", 12, size=64, seed=1, cache=False, workers=1)
    two = make_dataset("cxr", 12, size=64, seed=1, cache=False, workers=2)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.masks, two.masks)
    np.testing.assert_array_equal(one.labels, two.labels)
    np.testing.assert_array_equal(one.patient_ids, two.patient_ids)


def test_size_range_and_clear_errors():
    assert generate_one("cxr", 0, size=64).image.shape == (64, 64)
    big = generate_one("breast_us", 0, size=512)
    assert big.image.shape == (512, 512) and big.mask.shape == (512, 512)
    for bad in (63, 513, 1024):
        with pytest.raises(ValueError, match="64..512"):
            generate_one("cxr", 0, size=bad)
    with pytest.raises(TypeError, match="int pixel size"):
        generate_one("ct", 0, size=128.0)
    with pytest.raises(ValueError, match="64..512"):
        make_dataset("knee", 2, size=32, cache=False)


def test_unknown_family_bad_site_and_bad_params_raise():
    with pytest.raises(ValueError, match="Unknown phantom family 'mri'.*cxr"):
        generate_one("mri", 0)
    for bad in (6, -1):
        with pytest.raises(ValueError, match=r"0\.\.5"):
            generate_one("cxr", 0, site=bad)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        site_label_names("knee", 9)
    with pytest.raises(TypeError, match="accepts: view"):
        generate_one("ct", 0, findings={"liver": 1})
    with pytest.raises(ValueError, match="view='axial'"):
        generate_one("ct", 0, view="axial")
    with pytest.raises(ValueError, match="unknown finding 'fracture'"):
        generate_one("cxr", 0, findings={"fracture": 1})
    with pytest.raises(ValueError, match="n must be a positive int"):
        make_dataset("cxr", 0)
    with pytest.raises(ValueError, match="index"):
        generate_one("cxr", -3)


def test_cache_round_trip_is_identical_and_memory_mapped():
    first = make_dataset("knee", 10, size=64, seed=2, site=1)
    again = make_dataset("knee", 10, size=64, seed=2, site=1)
    fresh = make_dataset("knee", 10, size=64, seed=2, site=1, cache=False)
    for arr in (again.images, again.masks, again.labels):
        assert isinstance(arr, np.memmap)
    for name in ("images", "masks", "labels", "patient_ids"):
        np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(getattr(fresh, name)))
        np.testing.assert_array_equal(np.asarray(getattr(first, name)), np.asarray(getattr(fresh, name)))
    np.testing.assert_array_equal(again.meta["sequence"], fresh.meta["sequence"])
    folder = again.meta["cache_dir"]
    assert folder is not None and folder == first.meta["cache_dir"]
    other = make_dataset("knee", 10, size=64, seed=2, site=2)
    assert other.meta["cache_dir"] != folder


# ---------------------------------------------------------------- patients and sites

def test_several_images_per_patient_share_anatomy_and_chronic_findings():
    data = make_dataset("cxr", 48, size=64, cache=False)
    ids, counts = np.unique(data.patient_ids, return_counts=True)
    assert counts.max() >= 2 and len(ids) < 48
    chronic = [cxr.FINDINGS.index(f) for f in cxr.CHRONIC]
    for pid in ids[counts >= 2]:
        rows = np.where(data.patient_ids == pid)[0]
        for key in ("age", "sex", "ctr"):
            assert len(set(data.meta[key][rows].tolist())) == 1, key
        assert data.meta["visit"][rows].tolist() == list(range(len(rows)))
        chronic_rows = data.meta["findings_all"][rows][:, chronic]
        assert (chronic_rows == chronic_rows[0]).all()
    lungs = np.isin(data.masks, (1, 2))
    same, other = [], []
    for i in range(48):
        for j in range(i + 1, 48):
            iou = (lungs[i] & lungs[j]).sum() / (lungs[i] | lungs[j]).sum()
            (same if data.patient_ids[i] == data.patient_ids[j] else other).append(iou)
    assert np.mean(same) > np.mean(other) + 0.05  # same anatomy, slightly different positioning


def test_sites_differ_in_label_sets_and_prevalence():
    sets = {tuple(site_label_names("cxr", s)) for s in range(6)}
    assert len(sets) >= 4
    for s in range(6):
        names = site_label_names("cxr", s)
        assert names[0] == "no_finding" and set(names[1:]) <= set(cxr.FINDINGS)
    assert "support_devices" not in site_label_names("cxr", 2)
    icu = make_dataset("cxr", 160, size=64, site=1, cache=False)
    clinic = make_dataset("cxr", 160, size=64, site=2, cache=False)
    normal_icu = icu.labels[:, 0].mean()
    normal_clinic = clinic.labels[:, 0].mean()
    assert normal_clinic > normal_icu + 0.2
    devices = cxr.FINDINGS.index("support_devices")
    assert icu.meta["findings_all"][:, devices].mean() > 0.2
    assert (icu.meta["view"] == "AP").mean() > (clinic.meta["view"] == "AP").mean()


def test_no_finding_matches_the_findings_vector():
    data = make_dataset("cxr", 60, size=64, site=0, cache=False)
    assert (data.labels[:, 0] == (data.meta["findings_all"].sum(axis=1) == 0)).all()
    assert 0.2 < data.labels[:, 0].mean() < 0.9
    # the annotated labels are the matching columns of the full findings vector
    for j, name in enumerate(data.label_names[1:], start=1):
        np.testing.assert_array_equal(data.labels[:, j], data.meta["findings_all"][:, cxr.FINDINGS.index(name)])


def test_inversion_flag_stores_the_negative():
    plain = generate_one("cxr", 3, size=64, invert_prob=0.0)
    inverted = generate_one("cxr", 3, size=64, invert_prob=1.0)
    assert not plain.meta["inverted"] and inverted.meta["inverted"]
    np.testing.assert_array_equal(inverted.image, 255 - plain.image)
    emergency = make_dataset("cxr", 40, size=64, site=4, cache=False)
    assert 0 < emergency.meta["inverted"].mean() < 0.6


# ---------------------------------------------------------------- chest findings are visible where they should be

def test_masks_cover_the_drawn_organs():
    for i in range(6):
        s = generate_one("cxr", i, size=128, invert_prob=0.0)
        lungs, heart = np.isin(s.mask, (1, 2)), s.mask == 3
        assert s.image[lungs].mean() + 40 < s.image[heart].mean()
        cols = np.where(s.mask == 1)[1].mean(), np.where(s.mask == 2)[1].mean()
        assert cols[0] > cols[1]  # the left lung is on the viewer's right


def test_cardiomegaly_widens_the_heart_beyond_half_the_thorax():
    for i in range(8):
        normal, big = _cxr(i, cardiomegaly=0), _cxr(i, cardiomegaly=1)
        assert _ctr_from_mask(normal.mask) < 0.5 < _ctr_from_mask(big.mask)
        assert normal.meta["ctr"] < 0.5 < big.meta["ctr"]
        assert big.labels[cxr.site_label_names(0).index("cardiomegaly")] == 1


def test_effusion_brightens_the_lung_base():
    for i in range(6):
        dry, wet = _cxr(i, effusion=0), _cxr(i, effusion=1)
        lungs = np.isin(dry.mask, (1, 2))
        rows = np.where(lungs.any(axis=1))[0]
        base = lungs.copy()
        base[: rows.max() - (rows.max() - rows.min()) // 5] = False
        top = lungs & ~base
        assert wet.image[base].mean() > dry.image[base].mean() + 5
        assert abs(wet.image[top].mean() - dry.image[top].mean()) < abs(wet.image[base].mean() - dry.image[base].mean())


def test_pneumothorax_removes_lung_texture():
    ratios = []
    for i in range(6):
        lung, ptx = _cxr(i, pneumothorax=0), _cxr(i, pneumothorax=1)
        changed = ptx.image.astype(int) < lung.image.astype(int)
        region = ndi.binary_erosion(changed & np.isin(lung.mask, (1, 2)), iterations=3)
        assert region.sum() > 100

        def highpass(im):
            """The image minus its Gaussian blur: local texture."""
            return im.astype(float) - ndi.gaussian_filter(im.astype(float), 2.0)

        ratios.append(highpass(ptx.image)[region].var() / highpass(lung.image)[region].var())
    assert np.mean(ratios) < 0.93 and (np.array(ratios) < 1.0).mean() >= 0.8


def test_nodule_adds_a_small_bright_blob_inside_a_lung():
    for i in range(6):
        clear, nod = _cxr(i, nodule=0), _cxr(i, nodule=1)
        diff = nod.image.astype(int) - clear.image.astype(int)
        y, x = np.unravel_index(np.argmax(diff), diff.shape)
        assert diff.max() > 30
        assert clear.mask[y, x] in (1, 2)
        blob = diff > 15
        assert 5 < blob.sum() < 0.02 * blob.size


def test_other_findings_change_the_lungs():
    for finding in ("consolidation", "edema", "atelectasis", "mass", "emphysema", "support_devices"):
        off, on = _cxr(2, **{finding: 0}), _cxr(2, **{finding: 1})
        lungs = np.isin(off.mask, (1, 2))
        delta = on.image[lungs].astype(float).mean() - off.image[lungs].astype(float).mean()
        if finding == "emphysema":
            assert delta < -2, finding  # hyperlucent lungs
        else:
            assert delta > 0.3, finding


# ---------------------------------------------------------------- other families

def test_ct_organ_view_is_balanced_and_slice_view_labels_the_largest_organ():
    organ = make_dataset("ct", 60, size=64, cache=False)
    assert set(organ.labels.tolist()) == set(range(5))
    assert np.bincount(organ.labels, minlength=5).min() >= 5
    whole = make_dataset("ct", 30, size=64, cache=False, view="slice")
    assert whole.name == "phantom:ct?site=0&view=slice"
    for img_mask, lab in zip(whole.masks, whole.labels):
        areas = np.bincount(img_mask.ravel(), minlength=8)[1:6]
        assert lab == int(np.argmax(areas))
    s = generate_one("ct", 0, size=128, view="slice")
    liver, spine = s.mask == 1, s.mask == 7
    assert s.image[spine].mean() > s.image[liver].mean() > s.image[s.mask == 0].mean()


def test_knee_target_gives_a_binary_task_and_tears_are_visible():
    data = make_dataset("knee", 8, size=64, cache=False, target="acl_tear")
    assert data.task == "binary" and data.label_names == ["acl_tear"] and data.labels.shape == (8, 1)
    assert data.name.endswith("&target=acl_tear")
    with pytest.raises(ValueError, match="not a label"):
        make_dataset("knee", 4, size=64, cache=False, target="cartilage")
    with pytest.raises(ValueError, match="multi-label"):
        make_dataset("ct", 4, size=64, cache=False, target="liver")
    for i in range(4):
        intact, torn = (generate_one("knee", i, size=128, findings={"acl_tear": v, "meniscal_tear": 0})
                        for v in (0, 1))
        assert cc_label(intact.mask == 5).max() == 1 and cc_label(torn.mask == 5).max() >= 2
        whole, tear = (generate_one("knee", i, size=128, findings={"acl_tear": 0, "meniscal_tear": v})
                       for v in (0, 1))
        meniscus = whole.mask == 6
        assert tear.image[meniscus].mean() > whole.image[meniscus].mean() + 3
        assert whole.image[meniscus].mean() < whole.image[whole.mask == 1].mean()


def _shape_stats(mask: np.ndarray) -> tuple[float, float]:
    """(solidity, height / width) of the largest region of a binary mask."""
    props = max(regionprops(mask.astype(np.uint8)), key=lambda p: p.area)
    r0, c0, r1, c1 = props.bbox
    return props.solidity, (r1 - r0) / (c1 - c0)


def test_malignant_breast_lesions_are_irregular_and_taller_than_wide():
    benign = [_shape_stats(generate_one("breast_us", i, size=128, findings={"malignant": 0}).mask) for i in range(8)]
    malignant = [_shape_stats(generate_one("breast_us", i, size=128, findings={"malignant": 1}).mask)
                 for i in range(8)]
    assert np.mean([m[0] for m in malignant]) < np.mean([b[0] for b in benign]) - 0.03
    assert np.mean([m[1] for m in malignant]) > np.mean([b[1] for b in benign]) + 0.3
    assert max(b[1] for b in benign) < 1.0  # benign lesions are wider than tall
    s = generate_one("breast_us", 0, size=128, findings={"malignant": 0})
    ring = ndi.binary_dilation(s.mask == 1, iterations=6) & ~ndi.binary_dilation(s.mask == 1, iterations=2)
    assert s.image[s.mask == 1].mean() + 15 < s.image[ring].mean()  # hypoechoic lesion


def test_ultrasound_fan_and_thyroid_nodules():
    s = generate_one("thyroid_us", 1, size=128)
    assert s.image[0, 0] == 0 and s.image[0, -1] == 0  # outside the fan is black
    assert s.mask.sum() > 20  # every thyroid image has a nodule
    bright = []
    for i in range(6):
        m = generate_one("thyroid_us", i, size=128, findings={"malignant": 1})
        b = generate_one("thyroid_us", i, size=128, findings={"malignant": 0})
        assert m.labels.tolist() == [1.0] and b.labels.tolist() == [0.0]
        assert m.image[m.mask == 1].mean() < b.image[b.mask == 1].mean()
        bright.append(np.percentile(m.image[m.mask == 1], 99) > np.median(m.image[m.mask == 1]) + 60)
    assert np.mean(bright) >= 0.5  # microcalcifications: bright foci inside most malignant nodules
    normal = [generate_one("breast_us", i, size=64).meta["lesion"] for i in range(40)]
    assert "none" in normal and "benign" in normal and "malignant" in normal
