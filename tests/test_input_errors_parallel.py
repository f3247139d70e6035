"""Bad inputs to the parallel layers give the same ValueError on every rank, never a gloo abort.

Issue 19: with ``SFTAttention(context_parallel_group=...)`` an ``attention_mask`` on some ranks
only, or a different batch on one rank, made the mask's all-gather run with sizes that differ
between ranks, and gloo aborted the process (``Received data size doesn't match expected size``,
SIGABRT). The layers (and the Hugging Face context-parallel path) now agree on the shapes and the
mask's presence in one fixed-size collective first. Checked on 2 gloo processes for the
context-parallel layer, the Ulysses layer (which also needs ``deepspeed.init_distributed()``,
refused by name without it) and the Hugging Face backend; after the errors each group still
computes the whole-sequence answer (compared with one process running the unsplit layer).
"""

import json
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
from sft_kernels import SFTAttention

errors, checks = {}, {}


def expect_error(name, fn):
    try:
        fn()
        errors[name] = "no error"
    except (ValueError, TypeError) as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"


def rel(a, b):
    return float((a - b).norm() / b.norm())


L, C = 8, 16
N = L // WORLD
KW = dict(hidden_size=C, num_heads=2, window_size=3)


def shard(x):
    return x[:, RANK * N:(RANK + 1) * N]


def x(b, seed=0):
    return torch.randn(b, N, C, generator=torch.Generator().manual_seed(seed + RANK))


def mask(b):
    return torch.ones(b, N, dtype=torch.long)


def matches_one_process(name, layer):
    """The group still works after the errors: this rank's rows of the unsplit layer."""
    torch.manual_seed(0)
    ref = SFTAttention(**KW)
    layer.load_state_dict(ref.state_dict())
    full = torch.randn(2, L, C, generator=torch.Generator().manual_seed(5))
    m = torch.ones(2, L, dtype=torch.long)
    m[1, L - 3:] = 0  # right padding inside the last shard
    with torch.no_grad():
        checks[name] = rel(layer(shard(full), attention_mask=shard(m)), shard(ref(full, attention_mask=m)))


# ---------------------------------------------------------------- context parallelism
cp = SFTAttention(**KW, context_parallel_group=dist.group.WORLD)
expect_error("cp-mask-on-rank-0-only", lambda: cp(x(2), attention_mask=mask(2) if RANK == 0 else None))
expect_error("cp-batch-differs-with-masks", lambda: cp(x(2 + RANK), attention_mask=mask(2 + RANK)))
expect_error("cp-bad-mask-shape-on-rank-1", lambda: cp(x(2), attention_mask=mask(2)[:, :N - RANK]))
matches_one_process("cp-after-errors", cp)

# ---------------------------------------------------------------- Ulysses
expect_error("ulysses-without-deepspeed-init", lambda: SFTAttention(**KW, sequence_parallel_group=dist.group.WORLD))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
import deepspeed.comm.torch as ds_torch

ds_torch.build_shm_op = lambda: None  # its CPU all-reduce op (a JIT build); Ulysses' all-to-alls never use it
deepspeed.init_distributed(dist_backend="gloo")
sp = SFTAttention(**KW, sequence_parallel_group=dist.group.WORLD)
expect_error("ulysses-mask-on-rank-1-only", lambda: sp(x(2), attention_mask=mask(2) if RANK == 1 else None))
expect_error("ulysses-batch-differs-with-masks", lambda: sp(x(2 + RANK), attention_mask=mask(2 + RANK)))
expect_error("ulysses-length-differs", lambda: sp(torch.randn(2, N + RANK, C)))
matches_one_process("ulysses-after-errors", sp)

# ---------------------------------------------------------------- Hugging Face context parallelism
from transformers import AutoModelForCausalLM, LlamaConfig
from sft_kernels.integrations import transformers as sft_hf

sft_hf.register()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sft_sliding_window")


def hf_call(b):
    ids = torch.randint(1, 40, (b, N), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(RANK * N, (RANK + 1) * N).expand(b, N)
    with sft_hf.context_parallel(dist.group.WORLD):
        return model(input_ids=ids, attention_mask=torch.ones(b, N, dtype=torch.long), position_ids=pos).logits


expect_error("hf-batch-differs-with-masks", lambda: hf_call(2 + RANK))
checks["hf-after-errors-finite"] = float(torch.isfinite(hf_call(2)).all())
json.dump({"errors": errors, "checks": checks}, open(os.path.join(sys.argv[1], f"rank{RANK}.json"), "w"))
dist.barrier()
os._exit(0)  # no interpreter finalisation with deepspeed's communication state (as sft_kernels.train does)
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("input_errors_parallel")
    (tmp / "worker.py").write_text(WORKER)
    prebuild_deepspeed_cpu_ops()  # deepspeed.init_distributed's CPU op: built once, outside the ranks
    g = Group([[sys.executable, str(tmp / "worker.py"), str(tmp)]] * 2, rank_envs(2, free_port()))
    assert g.wait() == [0, 0], f"a rank aborted or failed instead of raising:\n{g.report()}"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


EXPECTED = {
    "cp-mask-on-rank-0-only": "ValueError: SFTAttention(context_parallel_group=...): attention_mask is given on group "
                              "rank(s) [0] but not on [1]",
    "cp-batch-differs-with-masks": "ValueError: SFTAttention(context_parallel_group=...): hidden_states batch differs "
                                   "across the group: [2, 3]",
    "ulysses-without-deepspeed-init": "ValueError: SFTAttention: sequence_parallel_group (DeepSpeed-Ulysses) needs "
                                      "deepspeed.init_distributed()",
    "ulysses-mask-on-rank-1-only": "ValueError: SFTAttention(sequence_parallel_group=...): attention_mask is given on "
                                   "group rank(s) [1] but not on [0]",
    "ulysses-batch-differs-with-masks": "ValueError: SFTAttention(sequence_parallel_group=...): hidden_states batch "
                                        "differs across the group: [2, 3]",
    "ulysses-length-differs": "ValueError: SFTAttention(sequence_parallel_group=...): hidden_states seqlen (tokens per "
                              "rank) differs across the group: [4, 5]",
    "hf-batch-differs-with-masks": "ValueError: sft_sliding_window with a context_parallel_group: the batch differs "
                                   "across the group: [2, 3]",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_same_error_on_every_rank(ranks, case):
    for r, data in enumerate(ranks):
        assert data["errors"][case].startswith(EXPECTED[case]), (r, case, data["errors"][case])


def test_one_bad_rank_stops_the_group(ranks):
    """The rank with the bad mask names it; its peer names that rank (no hang in a later collective)."""
    assert ranks[1]["errors"]["cp-bad-mask-shape-on-rank-1"] == (
        "ValueError: attention_mask must have shape (batch, seqlen) = (2, 4), got (2, 3)")
    assert ranks[0]["errors"]["cp-bad-mask-shape-on-rank-1"].startswith(
        "ValueError: SFTAttention(context_parallel_group=...): group rank(s) [1] rejected their inputs")


def test_groups_still_compute_after_the_errors(ranks):
    for r, data in enumerate(ranks):
        assert data["checks"]["cp-after-errors"] < 1e-12, (r, data["checks"])
        assert data["checks"]["ulysses-after-errors"] < 1e-12, (r, data["checks"])
        assert data["checks"]["hf-after-errors-finite"] == 1.0
