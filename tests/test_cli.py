"""The `sft-kernels` command as a user runs it."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    # 300 s is a hang guard, not a speed test: each command takes 1-3 s on an idle 2-core
    # machine (100x headroom for a loaded CI machine)
    return subprocess.run([sys.executable, "-m", "sft_kernels.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_info_lists_every_backend_with_a_reason():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = _run("info", env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for key in ("python", "torch", "triton", "deepspeed", "transformers", "GPU"):
        assert key in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("torch ", "triton ", "cuda "))}
    assert set(lines) == {"torch", "triton", "cuda"}
    for name, line in lines.items():
        if "[NO]" in line:
            assert len(line.split("[NO]", 1)[1].strip()) > 20, f"{name}: no reason given"
    if not torch.cuda.is_available():
        assert "[NO]" in lines["triton"] and "TRITON_INTERPRET" in lines["triton"]
    assert "SFTKernelsBuilder" in out


def test_help_lists_the_subcommands():
    res = _run("--help")
    assert res.returncode == 0
    for sub in ("info", "bench", "demo", "train"):
        assert sub in res.stdout


def test_demo_kernel_check_runs_as_a_module():
    """The demo's kernel check (the child `sft-kernels demo` starts per backend) on the torch backend."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "sft_kernels.demo", "cpu", "torch"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line.split() for line in res.stdout.splitlines()]
    assert [line[:3] for line in lines] == [["sliding_window_attention", "backend=torch", "on"],
                                            ["block_diag_matmul", "backend=torch", "on"]], res.stdout
