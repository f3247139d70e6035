"""The ``sft-kernels`` command.

    sft-kernels info                 versions, device, backend availability (like ds_report)
    sft-kernels bench [--quick]      benchmarks against the baselines (benchmarks/bench_*.py)
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


BENCHES = {"attention": "bench_attention.py", "block_diag": "bench_block_diag.py", "e2e": "bench_e2e.py"}


def run_benchmarks(ops, quick: bool, out, device) -> int:
    """Run benchmarks/bench_<op>.py for each op in a child process; returns the worst exit code."""
    import os
    import subprocess

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if not os.path.isdir(root):
        print("sft-kernels bench runs the scripts in the repository's benchmarks/ folder; "
              "run it from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    rc = 0
    for op in ops:
        cmd = [sys.executable, os.path.join(root, BENCHES[op])]
        if quick:
            cmd.append("--quick")
        if out:
            cmd += ["--out", os.path.join(out, op) if len(ops) > 1 else out]
        if device:
            cmd += ["--device", device]
        print("$ " + " ".join(cmd), flush=True)
        rc = max(rc, subprocess.run(cmd).returncode)
    return rc


def _cmd_bench(args) -> int:
    ops = list(BENCHES) if args.op == "all" else [args.op]
    return run_benchmarks(ops, args.quick, args.out, args.device)


def _cmd_train(args) -> int:
    from .train import main as train_main

    return train_main(args.train_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU and backend availability")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("ds_report", help="DeepSpeed's ds_report including the sft_kernels op", add_help=False)
    p.add_argument("ds_report_args", nargs=argparse.REMAINDER, help="ds_report's flags")
    p.set_defaults(func=_cmd_ds_report)
    p = sub.add_parser("bench", help="benchmark the ops against their baselines")
    p.add_argument("--op", choices=["all", *BENCHES], default="all")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/<device>/<date>-<commit>)")
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
