"""One rank of tests/test_hf_context_parallel.py (2 processes, gloo): Hugging Face models with
``attn_implementation="sft_sliding_window"`` and ``register(context_parallel_group=...)``.

Every rank builds the same tiny float64 model from a config (same seed), keeps its half of
each sequence, runs forward and backward, and compares with the oracle: the same model with
``attn_implementation="eager"`` run by this process alone on each whole sequence (its real
tokens, unpadded; no torch.distributed involved). Loss: the sum of the token losses of the shard over the
number of label tokens of the whole batch, so the sum over ranks is the whole-batch mean;
parameter gradients are all-reduced (summed) before the comparison. Writes relative errors,
control errors and the messages of the expected errors to ``rank<r>.json``.

argv: out_dir
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402

from helpers import summed_over_ranks  # noqa: E402  (tests/, this script's folder)

sft_hf.register()  # the name exists before any model is built

out_dir = sys.argv[1]
results, controls, errors = {}, {}, {}
B, L, VOCAB = 3, 24, 61
N = L // WORLD
LENGTHS = [24, 17, 9]  # row 1's padding starts in the last shard; row 2's last shard is all padding


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else d


def config(kind, window):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0,
                  use_cache=False, pad_token_id=0)
    if kind == "mistral":
        return MistralConfig(sliding_window=window, **common)
    return LlamaConfig(**common)


def build(kind, window, attn):
    torch.manual_seed(0)  # the same weights in both models and on every rank
    return AutoModelForCausalLM.from_config(config(kind, window), attn_implementation=attn).double()


def batch(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]  # shifted BEFORE sharding: the boundary token's label is the next shard's
    return ids, mask, shifted


def reference(kind, window, ids, mask, shifted):
    """Eager on each row's real tokens alone (no padding: eager turns the pad queries that see only
    pad keys into NaN); logits of pad positions are left zero and never compared."""
    model = build(kind, window, "eager")
    logits = torch.zeros(B, L, VOCAB, dtype=torch.float64)
    loss = 0.0
    for row, n in enumerate(mask.sum(1).tolist()):
        out = model(input_ids=ids[row:row + 1, :n]).logits[0]
        logits[row, :n] = out.detach()
        loss = loss + F.cross_entropy(out, shifted[row, :n], ignore_index=-100, reduction="sum")
    loss = loss / (shifted != -100).sum()
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def sharded(model, ids, mask, shifted, positions=True):
    lo, hi = RANK * N, (RANK + 1) * N
    pos = torch.arange(lo, hi).expand(B, N) if positions else None
    logits = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, lo:hi], position_ids=pos).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shifted[:, lo:hi].flatten(), ignore_index=-100, reduction="sum")
    loss = loss / (shifted != -100).sum()  # the whole batch's label count: known on every rank
    loss.backward()
    total, grads = summed_over_ranks(loss, model)
    return logits.detach(), total, grads


def compare(kind, window, model, ids, mask, shifted, ref=None, positions=True):
    ref_logits, ref_loss, ref_grads = ref if ref is not None else reference(kind, window, ids, mask, shifted)
    logits, loss, grads = sharded(model, ids, mask, shifted, positions)
    lo, hi = RANK * N, (RANK + 1) * N
    real = mask[:, lo:hi].bool()
    errs = {"logits": rel(logits[real], ref_logits[:, lo:hi][real]), "loss": rel(loss, ref_loss)}
    if set(grads) != set(ref_grads):  # patch_model's layers: one flat [q; k; v] weight, o_proj under attn.
        ref_grads = patched_names(ref_grads)
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    errs["grads_max"] = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
    return errs


def patched_names(grads):
    """The eager model's gradients under SFTAttentionHF's parameter names (qkv_groups=1: the rows
    of q_proj, k_proj, v_proj stacked and flattened)."""
    out = {}
    for name, g in grads.items():
        prefix, _, leaf = name.rpartition("self_attn.")
        if "self_attn." not in name:
            out[name] = g
        elif leaf == "o_proj.weight":
            out[f"{prefix}self_attn.attn.o_proj.weight"] = g
        elif leaf == "q_proj.weight":
            parts = [grads[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"]
            out[f"{prefix}self_attn.attn.qkv_proj.weight"] = torch.cat(parts, 0).reshape(-1)
    return out


def case(name, kind, window, registered=None, patched=False, lengths=LENGTHS, use_context_manager=False):
    ids, mask, shifted = batch(lengths)
    if use_context_manager:
        sft_hf.register(window_size=registered)
        model = build(kind, window, "sft_sliding_window")
        with sft_hf.context_parallel(dist.group.WORLD):
            errs = compare(kind, window, model, ids, mask, shifted)
    else:
        sft_hf.register(window_size=registered, context_parallel_group=dist.group.WORLD)
        model = build(kind, window, "sft_sliding_window")
        if patched:
            sft_hf.patch_model(model)
        errs = compare(kind, window, model, ids, mask, shifted)
    results[name] = errs


def expect_error(name, fn):
    try:
        fn()
    except ValueError as e:
        errors[name] = str(e)
    else:
        errors[name] = None


case("mistral-w5-gqa-padding", "mistral", 5)  # window below a shard
case("mistral-w12-no-padding", "mistral", 12, lengths=[L] * B)  # window = a shard
case("mistral-w20-padding", "mistral", 20)  # window above a shard
case("mistral-w7-patch-model", "mistral", 7, patched=True)  # SFTAttentionHF layers (patch_model)
case("llama-full-causal-context-manager", "llama", None, use_context_manager=True)  # no model window: all of the past

# ------------------------------------------------------------------ packed rows (context_parallel_packed=True)
PACKED = [[5, 11, 8], [24], [12, 12], [2, 19, 3]]  # across the boundary (12), whole row, on it, inside + across


def packed_batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(PACKED), L), generator=g)
    pos = torch.stack([torch.cat([torch.arange(m) for m in row]) for row in PACKED])
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = ids[:, 1:]
    shifted[:, :-1][pos[:, 1:] == 0] = -100  # no label across a packed boundary
    return ids, pos, shifted


def packed_reference(window, ids, pos, shifted):
    """Eager on each packed sequence alone."""
    model = build("mistral", window, "eager")
    logits = torch.zeros(*ids.shape, VOCAB, dtype=torch.float64)
    loss = 0.0
    for row, lengths in enumerate(PACKED):
        a = 0
        for m in lengths:
            out = model(input_ids=ids[row:row + 1, a:a + m]).logits[0]
            logits[row, a:a + m] = out.detach()
            loss = loss + F.cross_entropy(out, shifted[row, a:a + m], ignore_index=-100, reduction="sum")
            a += m
    loss = loss / (shifted != -100).sum()
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed_compare(window, model_window, ref):
    ids, pos, shifted = packed_batch()
    sft_hf.register(context_parallel_group=dist.group.WORLD, context_parallel_packed=True)
    model = build("mistral", model_window, "sft_sliding_window")
    lo, hi = RANK * N, (RANK + 1) * N
    logits = model(input_ids=ids[:, lo:hi], position_ids=pos[:, lo:hi]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shifted[:, lo:hi].flatten(), ignore_index=-100, reduction="sum")
    loss = loss / (shifted != -100).sum()
    loss.backward()
    total, grads = summed_over_ranks(loss, model)
    sft_hf.register()
    ref_logits, ref_loss, ref_grads = ref
    return {"logits": rel(logits.detach(), ref_logits[:, lo:hi]), "loss": rel(total, ref_loss),
            "grads_max": max(rel(grads[n_], ref_grads[n_]) for n_ in ref_grads)}


packed_ref5 = packed_reference(5, *packed_batch())
packed_results = {"mistral-w5-packed": packed_compare(5, 5, packed_ref5),
                  "mistral-w20-packed": packed_compare(20, 20, packed_reference(20, *packed_batch()))}
controls["packed-window-off-by-one"] = packed_compare(5, 4, packed_ref5)

# ------------------------------------------------------------------ controls: the comparison must fail
ids, mask, shifted = batch()
ref5 = reference("mistral", 5, ids, mask, shifted)
sft_hf.register(context_parallel_group=dist.group.WORLD)
controls["window-off-by-one"] = compare("mistral", 5, build("mistral", 4, "sft_sliding_window"), ids, mask, shifted,
                                        ref=ref5)
sft_hf.register()  # no group: every rank attends within its own shard only (global positions still)
controls["no-halo"] = compare("mistral", 5, build("mistral", 5, "sft_sliding_window"), ids, mask, shifted, ref=ref5)

# ------------------------------------------------------------------ what cannot work: ValueError on every rank
sft_hf.register(context_parallel_group=dist.group.WORLD)
model = build("mistral", 5, "sft_sliding_window")
lo, hi = RANK * N, (RANK + 1) * N
pos = torch.arange(lo, hi).expand(B, N)
left_pad = torch.ones(B, L, dtype=torch.long)
left_pad[1, :3] = 0
expect_error("left-padding",
             lambda: model(input_ids=ids[:, lo:hi], attention_mask=left_pad[:, lo:hi], position_ids=pos))
expect_error("local-positions", lambda: model(input_ids=ids[:, lo:hi], attention_mask=mask[:, lo:hi]))
packed = torch.cat([torch.arange(8), torch.arange(16)]).expand(B, L)[:, lo:hi]  # a second sequence starts at 8
expect_error("packed-rows", lambda: model(input_ids=ids[:, lo:hi], position_ids=packed))


def decode_with_cache():
    m = build("mistral", 5, "sft_sliding_window").eval()
    with torch.no_grad():
        out = m(input_ids=ids[:1, lo:hi], position_ids=pos[:1], use_cache=True)
        m(input_ids=ids[:1, :1], position_ids=torch.tensor([[L]]), past_key_values=out.past_key_values, use_cache=True)


expect_error("kv-cache", decode_with_cache)


class Layer(torch.nn.Module):
    is_causal = True
    config = None


q = torch.randn(B, 4, N, 8, dtype=torch.float64)
kv = torch.randn(B, 2, N, 8, dtype=torch.float64)
expect_error("softcap", lambda: sft_hf.sft_attention_forward(Layer(), q, kv, kv, None, softcap=50.0, position_ids=pos))
expect_error("sinks", lambda: sft_hf.sft_attention_forward(Layer(), q, kv, kv, None, s_aux=torch.zeros(4),
                                                           position_ids=pos))
cu = torch.tensor([0, N, 2 * N, 3 * N], dtype=torch.int32)
expect_error("cu-seq-lens", lambda: sft_hf.sft_attention_forward(Layer(), q, kv, kv, None, position_ids=pos,
                                                                 cu_seq_lens_q=cu, cu_seq_lens_k=cu))
mask4d = torch.zeros(B, 1, N, N, dtype=torch.float64)
expect_error("4d-mask", lambda: sft_hf.sft_attention_forward(Layer(), q, kv, kv, mask4d, position_ids=pos))
sft_hf.register(window_size=(3, 3), context_parallel_group=dist.group.WORLD)
expect_error("two-sided-with-padding", lambda: sft_hf.sft_attention_forward(
    Layer(), q, kv, kv, mask[:, lo:hi], is_causal=False, position_ids=pos))

with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as f:
    json.dump({"results": results, "controls": controls, "errors": errors, "packed": packed_results}, f,
              indent=1)
dist.barrier()
from sft_kernels.train.loop import exit_process  # noqa: E402

exit_process(0)  # the process group, then no interpreter finalisation (exit_process says why)
