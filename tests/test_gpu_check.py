"""``scripts/gpu_check.sh --dry-run``: the prepared GPU run's plumbing, on CPU at toy sizes.

Every step runs (environment, Triton tests, the three benchmarks, the CUDA build's command
line and test collection, the training-step benchmark) with its time box, writes its log
and JSON, and the run leaves summary.md, steps.jsonl and results.tar.gz in $OUT. The time
boxes are scaled up (GPU_CHECK_BUDGET) because a shared CI machine is slow and noisy: the
point here is that every step completes and reports, not how fast (about 2 minutes on 2
idle cores).
"""

import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["environment", "triton_tests", "bench_attention", "bench_block_diag", "cuda_build", "cuda_tests", "e2e"]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_BUDGET="2400")
    env.pop("TRITON_INTERPRET", None)  # the script sets what a dry run needs
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=3600)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS, steps
    bad = [s for s in steps if s["status"] != "ok"]
    assert not bad and res.returncode == 0, f"{bad}\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        for want in ("bench/attention.json", "bench/block_diag.json", "bench/e2e.json", "triton_tests.xml",
                     "cuda_tests.xml", "environment.log"):
            assert want in names, (want, sorted(names))
        data = json.load(tar.extractfile("./bench/attention.json"))
    assert {r["impl"] for r in data["records"]} >= {"sdpa_causal", "sft_torch"}
    assert any(s["impl"] == "cudnn" for s in data["skipped"])  # skipped with its reason on CPU
    summary = (out / "summary.md").read_text()
    assert "| e2e | ok |" in summary and "sliding-window attention" in summary and "block_diag_matmul" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.tar.gz", "steps.jsonl", "summary.md"]
