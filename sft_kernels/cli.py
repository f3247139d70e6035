"""The ``sft-kernels`` command.

    sft-kernels info                 versions, device, backend availability (like ds_report)
    sft-kernels bench [--quick]      benchmarks against the baselines (sft_kernels.bench)
    sft-kernels ds_report [flags]    DeepSpeed's ds_report with this package's op in its op table
    sft-kernels train [flags]        DeepSpeed-Chat step-1 SFT on the kernels (train --help)
    sft-kernels demo                 the README's main job on the local device
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from .info import report

    report()
    return 0


def _cmd_ds_report(args) -> int:
    from .integrations.deepspeed import ds_report

    return ds_report(args.ds_report_args)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=not args.full)


def _cmd_bench(args) -> int:
    from .bench import DEFAULT, run

    return run(list(DEFAULT) if args.op == "all" else [args.op], args.quick, args.out, args.device, toy=args.toy)


def _cmd_train(args) -> int:
    from .train import main as train_main

    return train_main(args.train_args)


def build_parser() -> argparse.ArgumentParser:
    from .bench import BENCHMARKS, DEFAULT

    parser = argparse.ArgumentParser(prog="sft-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU and backend availability")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("ds_report", help="DeepSpeed's ds_report including the sft_kernels op", add_help=False)
    p.add_argument("ds_report_args", nargs=argparse.REMAINDER, help="ds_report's flags")
    p.set_defaults(func=_cmd_ds_report)
    p = sub.add_parser("bench", help="benchmark the ops against their baselines")
    p.add_argument("--op", choices=["all", *BENCHMARKS], default="all",
                   help="all: " + ", ".join(DEFAULT) + " (context_parallel only when named)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes")
    size.add_argument("--toy", action="store_true", help="tiny shapes: every step in seconds (a smoke test)")
    p.add_argument("--out", default=None, help="result folder (default: the checkout's benchmarks/results/<device>/"
                   "<date>-<commit>, or ./sft_kernels_results/... for an installed package)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("train", help="supervised fine-tuning with DeepSpeed on the kernels", add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="flags of sft_kernels.train (see train --help)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("demo", help="check the kernels against the references, then benchmark")
    p.add_argument("--full", action="store_true", help="full benchmark sweep instead of the quick one")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # every flag, --help included, belongs to the train parser
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main() -> int:
    """The ``sft-kernels`` console script: :func:`main`; a train run ends through
    :func:`~sft_kernels.train.loop.exit_process` (the process group first, no finalisation)."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv[:1] == ["train"]:
        from .train.loop import exit_process

        exit_process(rc)
    return rc


if __name__ == "__main__":
    sys.exit(console_main())
