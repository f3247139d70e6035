"""The ``sft-kernels`` command.

    sft-kernels info                 versions, device, backend availability (like ds_report)
    sft-kernels demo                 the README's main job on the local device
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from .info import report

    report()
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU and backend availability")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="check the kernels against the references, benchmark, train")
    p.add_argument("--quick", action="store_true", help="smallest sizes only")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
