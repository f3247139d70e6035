"""DeepSpeed's ALST (``UlyssesSPAttentionHF.register_with_transformers``) with this package's
attention as its core (``sft_kernels.parallel.alst.register_alst``), on 2 gloo processes each
holding half of every row, against one process running the whole batch with the same backend.

One launch of ``tests/alst_worker.py`` (about 40 s on 2 shared cores, mostly start-up); the
tests read what each rank wrote.
"""

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "alst_worker.py")
# float64 models; both sides run the same kernels on the same whole sequences (the all-to-all only
# moves heads), so logits agree exactly and losses / gradients to summation order (measured
# <= 3.4e-16): 1e-12 leaves room for another summation order, none for a wrong key (>= 4e-4).
TOL = 1e-12
CONTROL_MIN = 1e-4  # measured >= 4.2e-4 (window off by one, ALST's own entry on left padding)
CASES = {"mistral-w5-unpadded", "mistral-w5-right-padded", "mistral-w5-left-padded", "mistral-w5-packed",
         "mistral-w20-packed", "llama-sqrt-packed", "llama-sqrt-right-padded", "mistral-w5-packed-local-cu-seq-lens"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    prebuild_deepspeed_cpu_ops()
    out = tmp_path_factory.mktemp("alst")
    g = Group([[sys.executable, WORKER, str(out)]] * 2, rank_envs(2, free_port()))
    assert g.wait() == [0, 0], g.report()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_forward_and_gradients_equal_one_process(ranks):
    """Unpadded, right- and left-padded, packed rows (sequences inside a shard and across the
    boundary, position_ids restarting), Mistral windows 5 and 20, Llama with the registered "sqrt"
    window; local cu_seq_lens handed to ALST's wrapper are dropped, not followed."""
    for r, data in enumerate(ranks):
        assert data["sp_world"] == 2
        assert set(data["results"]) == CASES
        for name, errs in data["results"].items():
            assert set(errs) == {"logits", "loss", "grads_max"}
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"rank {r} {name}: relative errors above {TOL}: {bad}"


def test_controls_fail_the_same_comparison(ranks):
    for r, data in enumerate(ranks):
        c = data["controls"]
        for b in ("unpadded", "packed"):
            assert c[f"window-off-by-one-{b}"]["loss"] > CONTROL_MIN, (r, c)
            assert c[f"window-off-by-one-{b}"]["grads_max"] > CONTROL_MIN, (r, c)
            assert c["oracle-window-off-by-one"][b] > CONTROL_MIN, (r, c)
        # ALST's own entry drops the mask: a left-padded row's real queries see its pad keys
        left = c["alst-alone-left-padded"]
        assert left["loss"] > CONTROL_MIN and left["grads_max"] > CONTROL_MIN, (r, left)
        # right padding under causal attention: no real query sees a pad key, so loss and gradients
        # agree even without the mask; only the pad positions' outputs (no label reads them) differ
        right = c["alst-alone-right-padded"]
        assert right["loss"] <= TOL and right["grads_max"] <= TOL, (r, right)
        # the shard's cu_seq_lens on the gathered sequence are refused by the op
        assert "cu_seqlens_q[-1] must equal the number of packed tokens" in c["alst-alone-local-cu-seq-lens"]
    # rank 1 holds row 1's pad positions (17..23), whose outputs differ without the mask
    assert ranks[1]["controls"]["alst-alone-right-padded"]["logits"] > CONTROL_MIN


def test_training_losses_equal_one_process(ranks):
    """fp32 Mistral (window 5), 4 AdamW steps over packed, right-padded, left-padded and unpadded
    batches: ALST on 2 ranks (gradients all-reduced) prints one process's losses (measured: the
    same float32 values)."""
    for r, data in enumerate(ranks):
        one, alst = data["train_one"], data["train_alst"]
        assert len(one) == len(alst) == 4
        for a, b in zip(alst, one):
            assert abs(a - b) <= 1e-6 * abs(b), (r, alst, one)
        assert len(set(one)) == 4  # the steps moved the model


def test_bytes_counted_on_the_calls_equal_the_model(ranks):
    """One forward + backward of the float64 Mistral (2 layers, 4 heads, 2 KV heads, head_dim 8) on
    a packed batch of 3 rows of 24 tokens: what each rank hands to all_to_all_single / all_gather
    equals sft_kernels.bench.context_parallel.alst_bytes per layer (27648 + 288 + 36 B)."""
    from sft_kernels.bench.context_parallel import alst_bytes

    per_layer = alst_bytes(2, 24, heads=4, kv_heads=2, head_dim=8, elem=8, batch=3)
    assert per_layer == 3 * (2 * (2 * 4 + 2 * 2) * 12 * 8 * 8 // 2 + 8 * 12 + 12)
    for r, data in enumerate(ranks):
        assert sum(data["sent"].values()) == 2 * per_layer, (r, data["sent"], per_layer)
        assert data["sent"]["all_gather"] == 2 * 3 * (8 * 12 + 12), (r, data["sent"])


TRAINER = os.path.join(ROOT, "tests", "alst_trainer_worker.py")


def _result(g, i):
    lines = [line for line in g.output(i).splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, g.report()
    return json.loads(lines[0][len("RESULT "):])


def test_hf_trainer_with_accelerate_parallelism_config(tmp_path):
    """HF Trainer + accelerate's ParallelismConfig(sp_backend="deepspeed", sp_size=2) with this
    backend as ALST's core (alst_parallelism_config), DeepSpeed ZeRO-1 on 2 gloo ranks, fp32
    Mistral window 5, batches of packed, right- and left-padded rows: the step losses, gradient
    norms and the eval loss of the same Trainer on one process (measured: losses within 1.2e-7,
    norms and eval loss the same floats). The control, ALST's own entry (masks dropped), must miss
    by more than fp32 rounding (left-padded rows' real tokens see pad keys)."""
    prebuild_deepspeed_cpu_ops()
    one = Group([[sys.executable, TRAINER, str(tmp_path / "one")]], rank_envs(1, free_port()))
    two = Group([[sys.executable, TRAINER, str(tmp_path / "two")]] * 2, rank_envs(2, free_port()))
    raw = Group([[sys.executable, TRAINER, str(tmp_path / "raw")]] * 2,
                rank_envs(2, free_port(), {"ALST_CONTROL": "deepspeed-entry"}))
    for g, world in ((one, 1), (two, 2), (raw, 2)):
        assert g.wait() == [0] * world, g.report()
    ref = _result(one, 0)
    assert len(ref["losses"]) == 4 and len(set(ref["losses"])) == 4

    def worst(got):
        pairs = list(zip(got["losses"], ref["losses"])) + list(zip(got["grad_norms"], ref["grad_norms"]))
        pairs.append((got["eval_loss"], ref["eval_loss"]))
        return max(abs(a - b) / abs(b) for a, b in pairs)

    for r in range(2):
        got = _result(two, r)
        assert len(got["losses"]) == 4
        assert worst(got) <= 1e-6, (r, got, ref)  # fp32 rounding, a few ulps
        assert worst(_result(raw, r)) > 1e-4, (r, _result(raw, r), ref)


def test_hf_trainer_with_accelerate_runs_this_backends_exchange(tmp_path):
    """The same Trainer through accelerate's ParallelismConfig, but alst_parallelism_config(P,
    exchange="halo" / "auto"): this backend's own context parallelism over ALST's group on the
    batches DeepSpeed's UlyssesSPDataLoaderAdapter shards (ALST's all-to-all entry replaced), on
    right-padded rows (the halo's inputs). Losses, gradient norms and the eval loss (run unsharded,
    as ALST's disable_in_eval) against one process; a window one key narrower (the model's
    sliding_window 4 instead of 5 on the ranks) must miss."""
    prebuild_deepspeed_cpu_ops()
    env = {"ALST_ROWS": "right"}
    one = Group([[sys.executable, TRAINER, str(tmp_path / "one")]], rank_envs(1, free_port(), env))
    runs = {ex: Group([[sys.executable, TRAINER, str(tmp_path / ex)]] * 2,
                      rank_envs(2, free_port(), dict(env, ALST_EXCHANGE=ex))) for ex in ("halo", "auto")}
    control = Group([[sys.executable, TRAINER, str(tmp_path / "narrow")]] * 2,
                    rank_envs(2, free_port(), dict(env, ALST_EXCHANGE="auto", ALST_WINDOW="4")))
    assert one.wait() == [0], one.report()
    ref = _result(one, 0)
    assert len(ref["losses"]) == 4 and len(set(ref["losses"])) == 4
    for ex, g in runs.items():
        assert g.wait() == [0, 0], g.report()
        for r in range(2):
            got = _result(g, r)
            pairs = list(zip(got["losses"], ref["losses"])) + list(zip(got["grad_norms"], ref["grad_norms"]))
            pairs.append((got["eval_loss"], ref["eval_loss"]))
            assert len(got["losses"]) == 4
            assert max(abs(a - b) / abs(b) for a, b in pairs) <= 1e-6, (ex, r, got, ref)
            # the layers ran this backend's exchange (2 layers x 4 steps, forward and checkpoint-free:
            # one call per layer per step); at P = 2 the choice by bytes is the halo everywhere
            assert got["exchanges"] == ["halo"] and got["layer_calls"] == 8, (ex, got)
    assert ref["exchanges"] == [] and ref["layer_calls"] == 0
    assert control.wait() == [0, 0], control.report()
    narrow = _result(control, 0)
    assert max(abs(a - b) / abs(b) for a, b in zip(narrow["losses"], ref["losses"])) > 1e-4, (narrow, ref)
