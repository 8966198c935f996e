"""`python -m medlib.models build|health|status NAME|all --profile tiny`: build the embedded backbones, re-check their
health, or say whether the built weights (and the notebook-04 LDM) still match their recipes."""

from __future__ import annotations

import argparse

from ..config import PROFILE_NAMES
from .build import BUILD_ORDER, backbone_status, build, build_all, recheck_health


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and build the requested backbone(s)."""
    parser = argparse.ArgumentParser(prog="python -m medlib.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train an embedded backbone and write weights + model card")
    b.add_argument("name", help="e.g. ssl-natural-vit-tiny, or 'all' for every family of the profile")
    b.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    b.add_argument("--device", default="auto")
    b.add_argument("--force", action="store_true", help="rebuild even if the weights are up to date")
    b.add_argument("--no-progress", action="store_true")
    h = sub.add_parser("health", help="re-run the health check of built weights and rewrite their model card")
    h.add_argument("name", help="e.g. ssl-natural-vit-tiny, or 'all'")
    h.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    h.add_argument("--device", default="auto")
    s = sub.add_parser("status", help="fresh / stale / missing for every embedded backbone and the LDM (exit 1 if any is not fresh)")
    s.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    args = parser.parse_args(argv)
    if args.command == "status":
        return status(args.profile)
    if args.command == "health":
        from ..config import get_profile

        suffix = get_profile(args.profile).backbone.embedded_suffix
        names = [f"{f}-{suffix}" for f in BUILD_ORDER] if args.name == "all" else [args.name]
        for name in names:
            recheck_health(name, args.profile, args.device)
        return 0
    kwargs = dict(device=args.device, progress=not args.no_progress, force=args.force)
    if args.name == "all":
        build_all(args.profile, **kwargs)
    else:
        build(args.name, args.profile, **kwargs)
    return 0


def status(profile: str) -> int:
    """Print the state of every embedded backbone of ``profile`` and of its LDM; 0 when all are fresh."""
    from ..config import get_profile
    from ..diffusion.build import ldm_status

    suffix = get_profile(profile).backbone.embedded_suffix
    states = [(f"{f}-{suffix}", *backbone_status(f"{f}-{suffix}", profile)) for f in BUILD_ORDER]
    states.append(("LDM (notebook 04)", *ldm_status(profile)))
    for name, state, reason in states:
        print(f"{state:8s} {name:24s} {reason}")
    return 0 if all(state == "fresh" for _, state, _ in states) else 1


if __name__ == "__main__":
    raise SystemExit(main())
