"""`python -m medlib.diffusion build --profile tiny`: build the profile's DiNO-Diffusion LDM (VAE + UNet).

``status`` prints whether the profile's built LDM matches the current recipe (fresh / stale / missing).
"""

from __future__ import annotations

import argparse

from ..config import PROFILE_NAMES


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and build (or report on) the profile's LDM."""
    parser = argparse.ArgumentParser(prog="python -m medlib.diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the VAE and the UNet, write fp16 weights + model card")
    b.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    b.add_argument("--device", default="auto")
    b.add_argument("--force", action="store_true", help="rebuild even if the weights are up to date")
    b.add_argument("--stop-after", type=int, default=None,
                   help="end this call after that many UNet steps (resumable: run again to continue)")
    b.add_argument("--no-eval", action="store_true", help="skip the FID / FD measurement at build time")
    b.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("status", help="fresh / stale / missing, and why")
    s.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    args = parser.parse_args(argv)
    from .build import build_ldm, ldm_status

    if args.command == "status":
        status, reason = ldm_status(args.profile)
        print(f"{status}: {reason}")
        return 0 if status == "fresh" else 1
    if args.stop_after is not None and args.stop_after < 1:
        parser.error("--stop-after must be a positive number of steps")
    build_ldm(args.profile, device=args.device, progress=not args.no_progress, force=args.force,
              stop_after=args.stop_after, evaluate=not args.no_eval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
