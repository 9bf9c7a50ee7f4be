"""Command line: ``cellsymphony demo``, ``cellsymphony run``, ``cellsymphony info``.

Only the standard library is imported at start-up, so ``cellsymphony --help`` is fast; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(args.out, n_cells=args.n_cells, seed=args.seed)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    print(f"cellsymphony {__version__}  (Python {platform.python_version()}, {platform.platform()})")
    for pkg in ("numpy", "anndata", "mudata", "scanpy", "squidpy", "spatialdata", "torch", "timm"):
        try:
            print(f"  {pkg:12s} {version(pkg)}")
        except PackageNotFoundError:
            print(f"  {pkg:12s} not installed")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"  devices      cpu{', ' + torch.cuda.get_device_name(0) if cuda else ''}")
    except ImportError:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellsymphony",
        description="Cell-level multimodal analysis of 10x Xenium runs and their matched H&E slides.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic tissue")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--n-cells", type=int, default=4000, help="cells in the synthetic section (default 4000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print versions and devices")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as err:
        print(f"cellsymphony {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
