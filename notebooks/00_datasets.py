# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python (medlib)
#     language: python
#     name: medlib
# ---

# %% [markdown]
# # 00 - The data the studies use
#
# Every study in this companion runs on the same data code. Without internet access we cannot
# download NIH ChestX-ray14, CheXpert or RadImageNet, so the **embedded default** is a set of
# *procedural radiology phantoms*: images drawn from anatomy, whose labels and masks are true by
# construction. The `paper` profile swaps in real data sets through the same loaders
# (`medlib.data.sources`), shown at the end on the real DICOM files that `pydicom-data` ships.
#
# What to look for: does each phantom look like its modality, do the masks sit on the organs,
# and do the "sites" differ the way real hospitals differ (exposure, prevalence, label sets)?

# %% [markdown]
# **Learning goals.** After this notebook you can (1) say what the embedded phantoms are and why their
# labels are true by construction, (2) tell how the six chest "sites" differ (exposure, prevalence, label
# sets), the acquisition differences every study has to survive, and (3) load real files through the
# same `medlib.data.sources` loaders (`dicom:`, `medmnist:`, `folder:`).
#
# **Prerequisites.** Python, NumPy arrays of images; nothing about deep learning yet. Terms:
# [phantom](../docs/glossary.md#phantom), [MedMNIST](../docs/glossary.md#medmnist), [RadImageNet](../docs/glossary.md#radimagenet).
#
# **Time on a laptop** (2-core CPU, `make reproduce`: one thread per notebook, two notebooks at once; every run's own time is in `reports/<profile>/runs.json` and on the summary page):
# `smoke` under 20 s, `tiny` about 0.5 min.
# No exercises here; notebooks 01-04 end with theirs.

# %% tags=["parameters"]
profile = None  # "smoke" | "tiny" | "gpu" | "paper"; None: $MEDLIB_PROFILE, else "tiny"

# %%
import numpy as np
import pandas as pd
import pydicom.data

from medlib.config import notebook_profile
from medlib.data import natural, phantoms, sources
from medlib.data.summary import describe, intensity_by_region, label_prevalence
from medlib.reporting import image_grid, save_figure, save_table, set_style

p = notebook_profile(profile)
set_style()
n, size, show = p.data.n_per_dataset, p.data.phantom_size, p.data.n_show
print(f"profile={p.name}: {n} images per data set at {size} px - {p.description}")

# %% [markdown]
# ## Chest radiographs
# Frontal chest phantoms: body, lungs, heart, mediastinum, diaphragm, ribs, clavicles and spine,
# with findings drawn where a radiologist would look for them. Masks: left lung, right lung, heart.

# %%
cxr = phantoms.make_dataset("cxr", n=n, size=size, seed=p.seed, site=0, progress=True)
titles = [", ".join(l for l, v in zip(cxr.label_names, row) if v) or "-" for row in cxr.labels[:show]]
fig = image_grid(cxr.images[:show], titles=[t[:28] for t in titles], suptitle="Chest radiograph phantoms (site 0) and their findings")
save_figure(fig, "00_cxr_grid", p)

# %%
fig = image_grid(cxr.images[:show], masks=cxr.masks[:show], suptitle="Masks: left lung (red), right lung (green), heart (blue)")
save_figure(fig, "00_cxr_masks", p)

# %% [markdown]
# The masks should cover the dark lung fields and the bright heart shadow. The table checks it
# numerically: mean intensity inside each region.

# %%
intensity_by_region(cxr).round(1)

# %% [markdown]
# ## Six "sites": six chest data sets
# Study 2 needs several chest data sets that differ like VinDr-CXR, CheXpert, MIMIC-CXR,
# ChestX-ray14 and PadChest do. A site changes the acquisition (exposure, noise, blur), the
# prevalence of each finding and which findings are annotated at all.

# %%
sites = {f"site {s}": phantoms.make_dataset("cxr", n=max(n // 2, 16), size=size, seed=p.seed, site=s) for s in range(6)}
prevalence = label_prevalence(sites)
table = prevalence.pivot(index="label", columns="dataset", values="prevalence")
save_table(prevalence, "00_cxr_label_prevalence", p)
table.round(3)

# %%
import matplotlib.pyplot as plt
import seaborn as sns

fig, ax = plt.subplots(figsize=(8, 4))
sns.heatmap(table, annot=True, fmt=".2f", cmap="mako", cbar_kws={"label": "prevalence"}, ax=ax)
ax.set(title="Label prevalence per site (blank = not annotated at that site)", xlabel="", ylabel="finding")
save_figure(fig, "00_cxr_prevalence_by_site", p)

# %% [markdown]
# Intensity histograms per site show the acquisition differences that a model must survive.

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, ds in sites.items():
    ax.hist(np.asarray(ds.images[:64]).ravel(), bins=64, histtype="step", density=True, label=name)
ax.set(title="Pixel intensity histograms per site", xlabel="intensity (uint8)", ylabel="density")
ax.legend(ncol=3, fontsize=8)
save_figure(fig, "00_cxr_intensity_by_site", p)

# %% [markdown]
# ## CT, knee MRI and ultrasound
# The other families carry the labels of studies 1 and 3: an OrganAMNIST-like organ label on
# axial CT slices, ACL and meniscal tears on sagittal knee MRI, benign vs malignant lesions on
# breast and thyroid ultrasound.

# %%
families = {f: phantoms.make_dataset(f, n=max(n // 4, 16), size=size, seed=p.seed) for f in ("ct", "knee", "breast_us", "thyroid_us")}
for family, ds in families.items():
    labels = [ds.label_names[int(l)] if ds.task == "multiclass" else ",".join(k for k, v in zip(ds.label_names, l) if v) or "-" for l in ds.labels[:8]]
    fig = image_grid(ds.images[:8], titles=labels, masks=ds.masks[:8], suptitle=f"{family}: images with masks and labels")
    save_figure(fig, f"00_{family}_grid", p)

# %% [markdown]
# ## The natural-image stand-in
# DINOv2 was trained on 142 M natural photos; ours learns from dead-leaves images (Baradad et al.
# 2021) mixed with the real photos that scikit-image and scikit-learn ship.

# %%
nat = natural.make_natural(max(show, 16), size=size, seed=p.seed)
fig = image_grid(nat.images[:show], suptitle="Natural stand-in: dead leaves + real photos")
save_figure(fig, "00_natural_grid", p)

# %% [markdown]
# ## Real DICOM files through the real loader
# `pydicom-data` ships real DICOM files; the `dicom:` source applies rescale slope/intercept,
# windowing and MONOCHROME1 inversion, converts to uint8 and never lets patient identifiers out.

# %%
real = {name: sources.load_source(f"dicom:{pydicom.data.get_testdata_file(name)}?size={size}")
        for name in ("RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm")}
images = np.stack([ds.images[0] for ds in real.values()])
fig = image_grid(images, titles=list(real), ncols=3, size=2.5, suptitle="Real DICOM files via medlib.data.sources")
save_figure(fig, "00_real_dicom", p)

# %% [markdown]
# ## Your real data sets (`paper` profile)
# The `paper` profile names real data sets by source string (`profile.data.sources`). If the files
# are where the string says, they are loaded and shown here; if not, the loader's error says what
# to put where. In the embedded profiles this list is empty.

# %%
for name, spec in p.data.sources.items():
    try:
        ds = sources.load_source(spec, split="train")
        save_figure(image_grid(ds.images[:8], suptitle=f"{name}: {spec}"), f"00_real_{name}", p)
    except (sources.DataError, FileNotFoundError) as err:
        print(f"{name} ({spec}) not available: {err}")

# %% [markdown]
# ## Summary of every data set shown

# %%
summary = describe({"cxr site 0": cxr, **sites, **families, "natural": nat, **real})
save_table(summary, "00_datasets_summary", p)
summary
