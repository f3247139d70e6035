"""The tiled MLP (DeepSpeed's TiledMLP through sft_kernels.modules.tiled_mlp) under ZeRO-3, on 2 gloo
processes, each with its own batch: the loss and every full (gathered, rank-averaged) parameter
gradient equal the plain MLP's under ZeRO-3, fp32, per element within 1e-6 of each tensor's
largest, with transformers' gradient checkpointing (as ``sft-kernels train --mlp_chunk_tokens``
runs) and without it. The MLP's parameters are partitioned (each rank holds half) and the MLP
really runs in chunks (46 tokens in pieces of at most 7, the last of 4). With the tiled loss sized
from a byte budget as well (``tiled_loss(tile_bytes=)``: the partitioned head's vocabulary read
from ``ds_shape``, DeepSpeed's TiledFusedLogitsLoss in pieces of at most 9 tokens) the same holds."""

import json
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

WORKER = r'''
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
import deepspeed
import torch.distributed as dist
import transformers
from deepspeed.utils import safe_get_full_grad
from sft_kernels.integrations.transformers import tiled_loss
from sft_kernels.modules.tiled_mlp import tiled_mlp

torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
RANK = dist.get_rank()
out_dir = sys.argv[1]
CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, use_cache=False)
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True,
      "gradient_clipping": 0.0}

g = torch.Generator().manual_seed(10 + RANK)
ids = torch.randint(0, 97, (2, 23), generator=g)
labels = ids.clone()
labels[RANK, :4] = -100


def run(tiled, checkpointing, tile_bytes=None):
    torch.manual_seed(0)  # the same initial weights on both ranks and in every run
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tiled:
        tiled_mlp(model, chunk_tokens=7)  # before deepspeed.initialize, as sft-kernels train does
    if tile_bytes:
        tiled_loss(model, tile_bytes=tile_bytes)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=DS)
    engine.train()
    mlp = engine.module.model.layers[0].mlp
    rows = []
    hook = mlp.down_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // i[0].shape[-1]))
    head_rows = []
    head = engine.module.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].numel() // i[0].shape[-1]))
    loss = engine(input_ids=ids, labels=labels).loss
    engine.backward(loss)
    hook.remove()
    head.remove()
    held = sum(p.ds_tensor.numel() for p in mlp.parameters()) / sum(p.ds_numel for p in mlp.parameters())
    grads = {n: safe_get_full_grad(p).double().tolist() for n, p in engine.module.named_parameters()}
    return {"loss": float(loss), "grads": grads, "rows": rows, "held": held, "head_rows": head_rows,
            "checkpointed": bool(engine.module.model.layers[0].gradient_checkpointing)}


out = {"plain_gc": run(False, True), "tiled_gc": run(True, True), "tiled": run(True, False),
       "tiled_gc_loss": run(True, True, tile_bytes=4 * 97 * 9 + 5)}  # 9 tokens of vocab-97 fp32 logits
json.dump(out, open(os.path.join(out_dir, f"rank{RANK}.json"), "w"))
dist.barrier()
os._exit(0)
'''


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiled_mlp_zero3")
    (tmp / "worker.py").write_text(WORKER)
    prebuild_deepspeed_cpu_ops()
    g = Group([[sys.executable, str(tmp / "worker.py"), str(tmp)]] * 2, rank_envs(2, free_port()))
    assert g.wait() == [0, 0], g.report()
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def _rel(a, b):
    import torch

    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("run", ["tiled_gc", "tiled", "tiled_gc_loss"], ids=["grad-ckpt", "no-ckpt", "with-tiled-loss"])
def test_tiled_mlp_under_zero3_equals_plain(ranks, run):
    for r in ranks:
        ref, got = r["plain_gc"], r[run]
        assert got["checkpointed"] == (run != "tiled")
        if run == "tiled_gc_loss":  # the head called per TiledFusedLogitsLoss piece: at most 9 tokens each
            assert got["head_rows"] and max(got["head_rows"]) <= 9, got["head_rows"]
        else:
            assert set(got["head_rows"]) == {46}, got["head_rows"]
        assert abs(got["loss"] - ref["loss"]) <= 1e-6 * ref["loss"], (got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 2 * 9 + 3
        bad = {n: _rel(got["grads"][n], g) for n, g in ref["grads"].items() if not _rel(got["grads"][n], g) <= 1e-6}
        assert not bad, bad
        # the MLP's calls, in tokens: 46 in 7 pieces (6 of 7, the last of 4) per pass, against all 46 at once;
        # passes: the forward (chunked under no_grad when checkpointed), TiledMLP's forward and its backward
        assert sorted(got["rows"]) == sorted(([7] * 6 + [4]) * (3 if got["checkpointed"] else 2)), got["rows"]
        # all 46 at once (the recompute's call ends inside down_proj, at its last saved tensor: torch's early stop)
        assert set(ref["rows"]) == {46} and ref["checkpointed"]
        assert 0.45 < got["held"] < 0.55, got["held"]  # ZeRO-3: each rank holds half the MLP
    assert ranks[0]["plain_gc"]["grads"] == ranks[1]["plain_gc"]["grads"]  # gathered: one averaged gradient
    assert ranks[0]["plain_gc"]["loss"] != ranks[1]["plain_gc"]["loss"]  # two batches really
