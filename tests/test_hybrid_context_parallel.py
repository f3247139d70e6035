"""The cheaper exchange per layer (issue 23): a hybrid Qwen2 (sliding-window and full-attention
layers alternating) under ``register(context_parallel_group=...)``, each layer through the halo or
DeepSpeed's ``UlyssesSPAttentionHF``, chosen by the bytes each would send
(:mod:`sft_kernels.parallel.hybrid`).

Two launches of ``tests/hybrid_context_parallel_worker.py`` on gloo, one after the other: 2
processes (MQA; the halo is the cheaper for every layer there) and 6 (MHA; Ulysses sends less than
a full layer's halo from P = 5 on). Each runs unpadded, right-padded and packed rows under the
policies "auto" (the choice), "halo" and "ulysses" (forced), against one process on the whole batch
with the same backend, and counts the bytes it sends. About 1.5 min on 2 idle cores.
"""

import json
import os
import sys

import pytest

from sft_kernels.parallel.hybrid import choose, halo_bytes, packed_row_halo_bytes, ulysses_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hybrid_context_parallel_worker.py")
# float64, the same kernels on both sides (the exchanges move keys or heads, the merge is by
# log-sum-exp): measured <= 2.8e-15; a wrong key moves the loss by >= 2.3e-4
TOL = 1e-12
CONTROL_MIN = 1e-4
KINDS = ("unpadded", "padded", "packed")
POLICIES = ("auto", "halo", "ulysses")


@pytest.fixture(scope="module", params=[2, 6], ids=["P2", "P6"])
def ranks(request, tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs

    prebuild_deepspeed_cpu_ops()
    world = request.param
    out = tmp_path_factory.mktemp(f"hybrid{world}")
    g = Group([[sys.executable, WORKER, str(out)]] * world, rank_envs(world, free_port()))
    assert g.wait() == [0] * world, g.report()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_every_exchange_equals_one_process(ranks):
    """Logits (real tokens), loss and every parameter gradient (summed over the group) of the whole
    batch on one process, whichever exchange each layer took."""
    for r, data in enumerate(ranks):
        assert set(data["results"]) == {f"{k}-{p}" for k in KINDS for p in POLICIES}
        for name, res in data["results"].items():
            bad = {k: v for k, v in res["errors"].items() if not v <= TOL}
            assert not bad, f"rank {r} {name}: relative errors above {TOL}: {bad}"


def test_the_bytes_counted_on_the_calls_equal_the_model(ranks):
    """What each rank handed to torch.distributed in the forward and backward equals the modelled
    bytes of the exchange each layer took, plus the checks both paths run first (a fixed all-gather
    of 6 float64; unpacked: 2 per row; packed: 1, and the int64 position_ids of the block)."""
    for r, data in enumerate(ranks):
        world, n = data["info"]["world"], data["info"]["n"]
        for name, res in data["results"].items():
            batch = 2 if name.startswith(("unpadded", "packed")) else 3
            if name.startswith("packed"):
                checks = (6 * 8 + 8 + 8 * batch * n) * (world - 1)
            else:
                checks = (6 * 8 + 2 * batch * 8) * (world - 1)
            model = sum(e["halo_bytes"][r] if e["exchange"] == "halo" else e["ulysses_bytes"] for e in res["layers"])
            assert res["bytes"] == model + checks * len(res["layers"]), (r, name, res["bytes"], model, checks)


def test_each_layer_takes_the_exchange_that_sends_less(ranks):
    """P = 6, MHA: full-attention layers take Ulysses (it sends 15,600 B per rank against the halo's
    23,440 on unpadded rows), sliding ones the halo (6,544); packed rows' full layers keep the halo
    (only crossing sequences' own keys travel: 12,848 B against 15,840). P = 2: the halo everywhere
    (a causal full layer's halo is at most Ulysses' bytes for P <= 4). Forced policies are followed."""
    world = ranks[0]["info"]["world"]
    types = ranks[0]["info"]["layer_types"]
    for r, data in enumerate(ranks):
        for name, res in data["results"].items():
            kind, policy = name.split("-")
            taken = [e["exchange"] for e in res["layers"]]
            assert len(taken) == len(types), (r, name)
            assert [e["window"] for e in res["layers"]] == [5 if t == "sliding_attention" else None for t in types]
            if policy != "auto":
                assert taken == [policy] * len(types), (r, name, taken)
                continue
            for e in res["layers"]:  # the choice is the cheaper of the two figures, the same on every rank
                cheaper = "ulysses" if e["ulysses_bytes"] < max(e["halo_bytes"]) else "halo"
                assert e["exchange"] == cheaper, (r, name, e)
            if world == 6 and kind != "packed":
                assert taken == ["halo" if t == "sliding_attention" else "ulysses" for t in types], (r, name, taken)
            else:
                assert taken == ["halo"] * len(types), (r, name, taken)
    if world == 6:
        layers = ranks[0]["results"]["unpadded-auto"]["layers"]
        assert (max(layers[0]["halo_bytes"]), max(layers[1]["halo_bytes"]), layers[1]["ulysses_bytes"]) == (
            6544, 23440, 15600)


def test_a_window_one_key_off_fails_the_comparison(ranks):
    for r, data in enumerate(ranks):
        for name, errs in data["controls"].items():
            assert errs["loss"] > CONTROL_MIN and errs["grads_max"] > CONTROL_MIN, (r, name, errs)


# ----------------------------------------------------------------------------- the rule alone
def _full_layer_halo(world, n, kv, d, e):
    """A causal full layer's halo, written from the layout: every rank sends its n rows to each later
    rank and returns the dK/dV of the rows it received, (P - 1) n rows of K and V in all, plus the
    10-float64 consistency all-gather."""
    return (world - 1) * n * 2 * kv * d * e + 80 * (world - 1)


@pytest.mark.parametrize("world,heads,kv", [(2, 4, 4), (4, 8, 8), (4, 32, 8), (8, 8, 8), (8, 32, 8), (16, 32, 8)])
def test_full_layer_bytes_from_the_layout(world, heads, kv):
    n, d, e = 64, 16, 2
    halo = halo_bytes(world, n, {(world * n - 1, 0): 1}, kv, d, e)
    assert halo == [_full_layer_halo(world, n, kv, d, e)] * world
    kv_sent = max(kv, world)  # DeepSpeed replicates K/V heads up to P
    assert ulysses_bytes(world, n, 1, heads, kv, d, e, n) == (
        4 * n * d * e * (heads + kv_sent) * (world - 1) // world + 8 * n * (world - 1))
    # a causal full layer: Ulysses sends less only when 2 (heads + kv) < P kv
    ulysses_cheaper = 2 * (heads + kv_sent) < world * kv
    assert choose("auto", halo, ulysses_bytes(world, n, 1, heads, kv, d, e, n)) == (
        "ulysses" if ulysses_cheaper else "halo")


def test_sliding_layer_halo_is_the_window():
    """W = 5 on shards of 12: an interior rank sends 4 rows forward and returns 4, a rank at an end 4."""
    assert halo_bytes(4, 12, {(4, 0): 3}, 2, 8, 4) == [3 * 4 * 128 + 240, 3 * 8 * 128 + 240, 3 * 8 * 128 + 240,
                                                       3 * 4 * 128 + 240]


def test_packed_rows_send_only_crossing_sequences():
    """A row of sequences [0, 12) [12, 20) [20, 24) on 2 ranks of 12: nothing crosses the boundary."""
    assert packed_row_halo_bytes(2, [[0, 12, 20, 24]], None, 2, 8, 4) == [56, 56]
    # [0, 14) crosses it: rank 1 receives the sequence's 12 keys before the boundary, unbounded window
    assert packed_row_halo_bytes(2, [[0, 14, 24]], None, 2, 8, 4) == [12 * 128 + 56, 12 * 128 + 56]


def test_a_tie_and_no_ulysses_stay_on_the_halo():
    assert choose("auto", [10, 7], 10) == "halo"
    assert choose("auto", [10, 7], 9) == "ulysses"
    assert choose("auto", [10, 7], None) == "halo"
    assert choose("ulysses", [1], None) == "halo"
    assert choose("ulysses", [1], 100) == "ulysses"
    assert choose("halo", [100], 1) == "halo"
    with pytest.raises(ValueError, match="policy"):
        choose("fastest", [1], 1)


def test_the_policy_switch_checks_its_value_and_the_record_is_scoped():
    pytest.importorskip("transformers")
    import importlib

    # the module (the package exports a context manager of the same name)
    cp = importlib.import_module("sft_kernels.integrations.transformers.context_parallel")

    with pytest.raises(ValueError, match="policy must be one of"):
        cp.set_context_parallel_exchange("fastest")
    cp.set_context_parallel_exchange("halo")
    try:
        assert cp._exchange["policy"] == "halo"
    finally:
        cp.set_context_parallel_exchange()
    assert cp._exchange["policy"] == "auto"
    from sft_kernels.integrations import transformers as sft_hf

    with pytest.raises(ValueError, match="policy must be one of"):
        sft_hf.register(context_parallel_exchange="fastest")
    sft_hf.register(context_parallel_exchange="ulysses")  # register sets it, as every other setting
    try:
        assert cp._exchange["policy"] == "ulysses"
    finally:
        sft_hf.register()
    assert cp._exchange["policy"] == "auto"
    with cp.record_exchanges() as outer:
        with cp.record_exchanges() as inner:
            assert cp._exchange["log"] is inner
        assert cp._exchange["log"] is outer
    assert cp._exchange["log"] is None
