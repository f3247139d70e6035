"""TRL's ``SFTTrainer(packing=True)`` with ``alst_parallelism_config(2)`` (this package's attention
as ALST's core, accelerate's sequence parallelism) and with ``alst_parallelism_config(2,
exchange="halo", packed=True)`` (this package's halo over ALST's group, on the same sharded packed
rows) on 2 gloo ranks against the same trainer on one process: step losses and gradient norms.
Five launches of ``tests/trl_sft_alst_worker.py``.
"""

import json
import os
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "trl_sft_alst_worker.py")
TOL = 1e-6  # fp32, measured: losses equal, gradient norms within 9.1e-8 (one ulp at step 2)
CONTROL_MIN = 1e-4


def run(world, tmp, *extra, exchange="ulysses"):
    g = Group([[sys.executable, WORKER, str(tmp), *extra]] * world,
              rank_envs(world, free_port(), {"TRL_EXCHANGE": exchange}))
    assert g.wait() == [0] * world, g.report()
    out = []
    for r in range(world):
        lines = [line for line in g.output(r).splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, g.report()
        out.append(json.loads(lines[0][len("RESULT "):]))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    prebuild_deepspeed_cpu_ops()
    tmp = tmp_path_factory.mktemp("trl")
    return {"one": run(1, tmp)[0], "alst": run(2, tmp), "alst-window-off-by-one": run(2, tmp, "4"),
            "halo": run(2, tmp, exchange="halo"), "halo-window-off-by-one": run(2, tmp, "4", exchange="halo")}


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("mode", ["alst", "halo"])
def test_packed_sft_steps_equal_one_process(runs, mode):
    one = runs["one"]
    assert len(one["losses"]) == 3
    for r, data in enumerate(runs[mode]):
        for key in ("losses", "grad_norms"):
            errs = [rel(a, b) for a, b in zip(data[key], one[key])]
            assert len(errs) == 3 and max(errs) <= TOL, (mode, r, key, data[key], one[key])
        if mode == "halo":  # every layer call through this backend's halo: 2 layers x 3 steps x (forward +
            # the recompute of SFTConfig's default gradient checkpointing)
            assert data["exchanges"] == ["halo"] and data["layer_calls"] == 12, (r, data)
        else:  # ALST's all-to-all, this backend only its core
            assert data["exchanges"] == [] and data["layer_calls"] == 0, (r, data)


@pytest.mark.parametrize("mode", ["alst", "halo"])
def test_a_window_one_key_off_fails_the_comparison(runs, mode):
    one = runs["one"]
    for data in runs[f"{mode}-window-off-by-one"]:
        assert max(rel(a, b) for a, b in zip(data["losses"], one["losses"])) > CONTROL_MIN, data
