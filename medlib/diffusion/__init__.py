"""DiNO-Diffusion (Jimenez-Perez et al. 2024): the pipeline and its frozen DINO condition encoder, the small VAE, LDM training, metrics."""

from .metrics import (
    INCEPTION_NAME, MemorisationResult, fd_backbone_name, fd_name, fd_ssl, fid_kid, frechet_distance,
    generative_report, inception_features, inception_weights_path, memorisation, plot_memorisation, prdc,
    report_frame, ssl_features,
)
from .pipeline import (
    SCHEDULERS, TOKEN_KINDS, DiNODiffusionPipeline, DinoConditionEncoder, build_pipeline, make_scheduler,
    manifold_sample, null_condition_like, slerp, small_unet_config,
)
from .train import LDMResult, cache_conditioning, diffusion_loss, drop_condition, train_ldm
from .vae import (
    VAEResult, latent_scaling_factor, make_vae, reconstruct, reconstruction_metrics, resize_images, small_vae_config,
    train_vae,
)

__all__ = [
    "INCEPTION_NAME", "MemorisationResult", "fd_backbone_name", "fd_name", "fd_ssl", "fid_kid", "frechet_distance",
    "generative_report", "inception_features", "inception_weights_path", "memorisation", "plot_memorisation", "prdc",
    "report_frame", "ssl_features",
    "DiNODiffusionPipeline", "DinoConditionEncoder", "LDMResult", "SCHEDULERS", "TOKEN_KINDS", "VAEResult",
    "build_pipeline", "cache_conditioning", "diffusion_loss", "drop_condition", "latent_scaling_factor",
    "make_scheduler", "make_vae", "manifold_sample", "null_condition_like", "reconstruct", "reconstruction_metrics",
    "resize_images", "slerp", "small_unet_config", "small_vae_config", "train_ldm", "train_vae",
]
