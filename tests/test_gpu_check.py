"""``scripts/gpu_check.sh``: its plan (order, needs, time boxes) and its dry run on CPU.

``--plan``: correctness before numbers, nothing that needs the CUDA extension before the
step that builds it, and time boxes that leave at least 30 s of the 420 s budget.
``--dry-run``: every step runs (environment, the smoke test, the benchmarks, the CUDA build's
command line and test collection, the Triton suites, the training-step benchmark) with its
time box, writes its log and JSON, and the run leaves summary.md, steps.jsonl and
results.tar.gz in $OUT. The time boxes are scaled up (GPU_CHECK_BUDGET) because a shared CI
machine is slow and noisy: the point is that every step completes and reports, not how
fast (about 3 minutes on 2 idle cores).
"""

import json
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["environment", "smoke", "bench_attention", "bench_block_diag", "cuda_build", "cuda_tests", "cuda_bench",
         "triton_tests", "e2e"]
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _plan():
    res = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    table = {}
    for line in lines[1:]:
        if line.startswith(("total ", "command ")):
            break
        name, limit, needs = line.split()[:3]
        table[name] = (int(limit.rstrip("s")), [] if needs == "-" else needs.split(","))
    commands = dict(line[len("command "):].split(": ", 1) for line in lines if line.startswith("command "))
    total = next(line for line in lines if line.startswith("total "))
    return res.returncode, table, commands, total


def test_plan_order_needs_and_slack():
    rc, table, commands, total = _plan()
    assert list(table) == STEPS, list(table)
    order = {name: i for i, name in enumerate(STEPS)}
    # correctness first: the smoke test runs before any benchmark
    assert order["smoke"] < min(i for n, i in order.items() if n.startswith("bench"))
    # what needs the built extension runs after the build and says so
    for name, cmd in commands.items():
        if "sft_cuda" in cmd or "test_cuda_backend" in cmd:
            assert "cuda_build" in table[name][1] and order[name] > order["cuda_build"], (name, cmd)
    for name, (_, needs) in table.items():
        assert all(order[n] < order[name] for n in needs), (name, needs)
    # the time boxes and their kill graces leave >= 30 s of the 420 s budget
    limits = sum(limit for limit, _ in table.values())
    grace = int(re.search(r"x (\d+)s kill grace", total).group(1))
    slack = 420 - limits - grace * len(table)
    assert slack >= 30 and f"slack {slack}s" in total and rc == 0, total


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_BUDGET="2400")
    env.pop("TRITON_INTERPRET", None)  # the script sets what a dry run needs
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=3600)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS, steps
    bad = [s for s in steps if s["status"] != "ok"]
    assert not bad and res.returncode == 0, f"{bad}\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        for want in ("smoke.xml", "bench/attention.json", "bench/block_diag.json", "bench/e2e.json",
                     "triton_tests.xml", "cuda_tests.xml", "environment.log", "bench/attention.partial.jsonl"):
            assert want in names, (want, sorted(names))
        data = json.load(tar.extractfile("./bench/attention.json"))
    assert {r["impl"] for r in data["records"]} >= {"sdpa_causal", "sft_torch"}
    assert any(s["impl"] == "cudnn" for s in data["skipped"])  # skipped with its reason on CPU
    summary = (out / "summary.md").read_text()
    assert "| e2e | ok |" in summary and "sliding-window attention" in summary and "block_diag_matmul" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.tar.gz", "steps.jsonl", "summary.md"]
