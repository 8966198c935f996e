"""`python -m medlib.models build NAME|all --profile tiny`: build the embedded backbones."""

from __future__ import annotations

import argparse

from ..config import PROFILE_NAMES
from .build import build, build_all


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
    args = parser.parse_args(argv)
    kwargs = dict(device=args.device, progress=not args.no_progress, force=args.force)
    if args.name == "all":
        build_all(args.profile, **kwargs)
    else:
        build(args.name, args.profile, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
