"""Hugging Face models with context parallelism: ``register(context_parallel_group=...)`` /
``context_parallel(group)`` on 2 gloo processes, each holding half of every sequence,
against one process running the whole sequence with ``attn_implementation="eager"``.

One launch of ``tests/hf_context_parallel_worker.py`` (process start-up dominates: about
half a minute on an idle core); the tests below read what each rank wrote.
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")

from _procs import Group, free_port, rank_envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hf_context_parallel_worker.py")
# float64 models, but transformers' eager attention takes its softmax in float32
# (eager_attention_forward): eager against itself in float64 would agree to 1e-15, eager against
# this backend on one process agrees to 1.2e-7 (logits 4e-8, gradients up to 1.2e-7), measured.
TOL = 1e-6
CONTROL_MIN = 1e-4  # what a wrong window or a missing halo does to the same comparison (measured >= 7e-4)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hfcp")
    g = Group([[sys.executable, WORKER, str(out)]] * 2, rank_envs(2, free_port()))
    assert g.wait() == [0, 0], g.report()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_logits_loss_and_gradients_equal_eager_on_the_whole_sequence(ranks):
    expected = {"mistral-w5-gqa-padding", "mistral-w12-no-padding", "mistral-w20-padding", "mistral-w7-patch-model",
                "llama-full-causal-context-manager"}
    for r, data in enumerate(ranks):
        assert set(data["results"]) == expected
        for name, errs in data["results"].items():
            assert set(errs) == {"logits", "loss", "grads_max"}
            bad = {k: v for k, v in errs.items() if not v < TOL}
            assert not bad, f"rank {r} {name}: relative errors above {TOL}: {bad}"


def test_packed_rows_equal_eager_on_each_sequence(ranks):
    """register(context_parallel_group=..., context_parallel_packed=True): rows of packed sequences
    (position_ids restarting; a sequence across the shard boundary, one starting on it, one inside a
    shard) give eager's logits, loss and gradients on each sequence alone; a window one key
    narrower misses."""
    for r, data in enumerate(ranks):
        assert set(data["packed"]) == {"mistral-w5-packed", "mistral-w20-packed"}
        for name, errs in data["packed"].items():
            bad = {k: v for k, v in errs.items() if not v < TOL}
            assert not bad, f"rank {r} {name}: relative errors above {TOL}: {bad}"
        c = data["controls"]["packed-window-off-by-one"]
        assert c["loss"] > CONTROL_MIN and c["grads_max"] > CONTROL_MIN, (r, c)


def test_controls_fail_the_same_comparison(ranks):
    """A window one key too narrow, and each rank attending within its own shard only (no halo),
    must be far outside the tolerance: the comparison can see a halo-sized error."""
    for r, data in enumerate(ranks):
        c = data["controls"]
        assert min(c["window-off-by-one"].values()) > CONTROL_MIN, (r, c)
        assert c["window-off-by-one"]["grads_max"] > CONTROL_MIN
        # the loss and gradients cover both shards, so a missing halo shows on every rank;
        # the logits of rank 0 have no left halo and are exact
        assert c["no-halo"]["loss"] > CONTROL_MIN and c["no-halo"]["grads_max"] > CONTROL_MIN, (r, c)
    assert ranks[1]["controls"]["no-halo"]["logits"] > CONTROL_MIN
    assert ranks[0]["controls"]["no-halo"]["logits"] < TOL


@pytest.mark.parametrize("name, message", [
    ("left-padding", "not right-padded across the sequence"),
    ("local-positions", "position_ids must be the global positions"),
    ("packed-rows", "position_ids must be the global positions"),
    ("kv-cache", "KV cache"),
    ("softcap", "softcap"),
    ("sinks", "sinks"),
    ("cu-seq-lens", "packed rows"),
    ("4d-mask", "4D masks cannot be checked across shards"),
    ("two-sided-with-padding", "needs causal=True"),
])
def test_what_cannot_work_raises_on_every_rank(ranks, name, message):
    for r, data in enumerate(ranks):
        got = data["errors"][name]
        assert got is not None, f"rank {r}: {name} did not raise"
        assert message in got, (r, got)


def test_register_checks_the_group(monkeypatch):
    import torch.distributed as dist

    from sft_kernels.integrations.transformers import register

    # as in a fresh process (other tests of the session may have initialised the default group)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        register(context_parallel_group=object())
    register()  # the settings stay usable


def _example(world, tmp_path):
    script = os.path.join(ROOT, "examples", "hf_context_parallel.py")
    g = Group([[sys.executable, script, "--device", "cpu", "--seqlen", "96", "--steps", "4"]] * world,
              rank_envs(world, free_port()))
    assert g.wait() == [0] * world, g.report()
    return [float(line.split()[-1]) for line in g.output(0).splitlines() if line.startswith("step ")]


def test_example_two_ranks_train_like_one(tmp_path):
    """examples/hf_context_parallel.py on 2 ranks (halves of each sequence, window 32 over blocks of
    48) prints the losses of the same script on one process holding the whole sequence."""
    two, one = _example(2, tmp_path), _example(1, tmp_path)
    assert len(two) == len(one) == 4
    for a, b in zip(two, one):
        assert abs(a - b) <= 1e-5 * abs(b), (two, one)  # fp32, 4 AdamW steps (measured <= 2.4e-7: the printed digits)
