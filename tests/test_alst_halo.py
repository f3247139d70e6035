"""The halo exchange behind DeepSpeed's ``UlyssesSPDataLoaderAdapter``: ALST's data layout
(each rank a block of consecutive tokens, global position_ids, ``shift_labels``) is the halo's,
so ``register(context_parallel_group=<DeepSpeed's sequence-parallel group>)`` runs a model on the
adapter's micro-batches as is, unpacked rows and packed ones (``context_parallel_packed=True``).

Three launches of ``tests/alst_halo_worker.py`` on 2 gloo processes, side by side (about 40 s).
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "alst_halo_worker.py")
TOL = 1e-12  # float64, the same backend on both sides: measured <= 3.5e-16
CONTROL_MIN = 1e-4


@pytest.fixture(scope="module")
def runs():
    prebuild_deepspeed_cpu_ops()
    groups = {name: Group([[sys.executable, WORKER, kind, window]] * 2, rank_envs(2, free_port()))
              for name, (kind, window) in {"plain": ("plain", "5"), "packed": ("packed", "5"),
                                           "packed-window-off-by-one": ("packed", "4")}.items()}
    out = {}
    for name, g in groups.items():
        assert g.wait() == [0, 0], g.report()
        out[name] = []
        for r in range(2):
            lines = [line for line in g.output(r).splitlines() if line.startswith("RESULT ")]
            assert len(lines) == 1, g.report()
            out[name].append(json.loads(lines[0][len("RESULT "):]))
    return out


@pytest.mark.parametrize("name", ["plain", "packed"])
def test_adapter_batches_through_the_halo_equal_one_process(runs, name):
    """4 micro-batches (2 rows of 24 tokens from each rank's loader, served in the adapter's order):
    loss and all-reduced gradients of the same model on one process within 1e-12."""
    for r, data in enumerate(runs[name]):
        assert len(data["steps"]) == 4
        for step, errs in enumerate(data["steps"]):
            assert errs["loss"] <= TOL and errs["grads_max"] <= TOL, (name, r, step, errs)
    if name == "packed":  # the adapter hands each rank the row's own restarting positions
        assert runs[name][1]["position_ids_0"] == [7, 8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7]


def test_a_window_one_key_off_fails_the_comparison(runs):
    for r, data in enumerate(runs["packed-window-off-by-one"]):
        assert min(e["grads_max"] for e in data["steps"]) > CONTROL_MIN, (r, data)
        assert max(e["loss"] for e in data["steps"]) > CONTROL_MIN, (r, data)
