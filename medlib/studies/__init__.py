"""One module per study notebook: that study's protocol (its data sets, grid, tables, figures and claims).

- :mod:`~medlib.studies.radiology_benchmark` - notebook 01, Baharoon et al. 2023 (arXiv 2312.02366).
- :mod:`~medlib.studies.imagenet_vs_ssl_init` - notebook 02, Tayebi Arasteh et al. 2023 (arXiv 2308.07688).
- :mod:`~medlib.studies.radimagenet_ssl_continuation` - notebook 03, Lange & Shekel 2024.
- :mod:`~medlib.studies.dino_diffusion` - notebook 04, Jimenez-Perez et al. 2024 (arXiv 2407.11594).

Everything a study reuses (metrics, kNN, probes, fine-tuning, segmentation, statistics, SSL training,
the diffusion pipeline) lives in ``medlib.eval``, ``medlib.models``, ``medlib.ssl`` and ``medlib.diffusion``;
a study module may import those, never another study module, and nothing outside ``studies`` imports a study.
Modules are imported on demand (``from medlib.studies import dino_diffusion as study``), so loading one
study does not load the others.
"""

STUDY_MODULES = {
    "01_dinov2_radiology_benchmark": "radiology_benchmark",
    "02_imagenet_vs_ssl_init": "imagenet_vs_ssl_init",
    "03_radimagenet_ssl_continuation": "radimagenet_ssl_continuation",
    "04_dino_diffusion": "dino_diffusion",
}

__all__ = ["STUDY_MODULES"]
