#!/usr/bin/env python3
"""Mutation check: does the test suite catch realistic bugs?

Each mutation below is a bug someone could plausibly write (a window edge off by one,
a wrong GQA head mapping, rounding instead of flooring, ...). For each, this script
copies the working tree to a temporary directory, applies that one change, runs the
tests that should catch it there, and records whether they failed. Every listed
mutation must be caught; the script exits 1 if one survives, or if a mutation no longer
applies (its code moved: update the list).

    python scripts/mutation_check.py              # all mutations (about 20-30 min on 2 cores)
    python scripts/mutation_check.py --list       # names only
    python scripts/mutation_check.py sqrt gqa     # those whose name contains a word given

Run it before resolving a change to the ops or the tests, and whenever tests change; it is
too slow for every CI run. The tests run with a fixed hypothesis seed, so a mutation is
caught by the suite's fixed cases or by a reproducible draw, not by luck.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATT = "sft_kernels/ops/sliding_window_attention"
BD = "sft_kernels/ops/block_diag"


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: List[str]
    select: Optional[str] = None  # pytest -k expression
    note: str = ""
    count: int = 1  # occurrences of `old` the mutation replaces (all of them)


MUTATIONS = [
    # ------------------------------------------------------------------ window rules
    Mutation(
        "sqrt_rounds_window_py", "sft_kernels/window.py",
        "    return math.isqrt(max(int(n), 0))",
        "    return int(round(math.sqrt(max(int(n), 0))))",
        ["tests/test_attention.py"], "torch_path and sqrt",
        "floor(sqrt L) -> round(sqrt L) in the shared rule (L = 15: 4 keys instead of 3)",
    ),
    Mutation(
        "sqrt_rounds_triton", f"{ATT}/triton_jit.py",
        "    r = tl.sqrt(n.to(tl.float32)).to(tl.int32)\n    r = tl.where(r * r > n, r - 1, r)\n"
        "    r = tl.where((r + 1) * (r + 1) <= n, r + 1, r)\n",
        "    r = (tl.sqrt(n.to(tl.float32)) + 0.5).to(tl.int32)\n",
        ["tests/test_attention.py"], "triton and sqrt",
        "the Triton _isqrt rounds",
    ),
    Mutation(
        "packed_window_from_query_length_torch", "sft_kernels/window.py",
        "        left, right = spec.resolve(ck[i + 1] - ck[i])",
        "        left, right = spec.resolve(cq[i + 1] - cq[i])",
        ["tests/test_attention.py"], "(varlen or packed) and not triton",
        "a packed sequence's int / sqrt window resolved from its query length",
    ),
    Mutation(
        "packed_window_from_query_length_triton", f"{ATT}/triton_jit.py",
        "    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)",
        "    left, right = _resolve_window(left, right, keys, seqlen_q, WINDOW_MODE, CAUSAL)",
        ["tests/test_attention.py"], "triton and (varlen or packed)",
        "as above, in the Triton kernels (the query-tile prologue and dK/dV resolve the window)", count=2,
    ),
    Mutation(
        "causal_keeps_right", "sft_kernels/window.py",
        "        if causal:\n            right = 0\n",
        "",
        ["tests/test_attention.py", "tests/test_reference.py"], None,
        "causal=True no longer forces right = 0 for an explicit (left, right)",
    ),
    Mutation(
        "int_window_centre_swapped", "sft_kernels/window.py",
        "    return w // 2, (w - 1) // 2",
        "    return (w - 1) // 2, w // 2",
        ["tests/test_attention.py"], "torch_path",
        "an even non-causal int window puts its extra key on the right",
    ),
    Mutation(
        "left_edge_off_by_one_torch", "sft_kernels/window.py",
        "        mask &= j >= i - left",
        "        mask &= j > i - left",
        ["tests/test_attention.py"], "torch_path",
        "the band mask the PyTorch path applies (window.band_mask) drops its leftmost key",
    ),
    Mutation(
        "right_edge_off_by_one_triton", f"{ATT}/triton_jit.py",
        "    keep = keep & ((right < 0) | (cols <= pos + right))",
        "    keep = keep & ((right < 0) | (cols < pos + right))",
        ["tests/test_attention.py"], "triton",
        "the Triton band mask drops its rightmost key",
    ),
    Mutation(
        "unmasked_partial_tile_triton", f"{ATT}/triton_jit.py",
        "    full_hi = tl.maximum((upper // BLOCK_N) * BLOCK_N, full_lo)",
        "    full_hi = tl.maximum(tl.cdiv(upper, BLOCK_N) * BLOCK_N, full_lo)",
        ["tests/test_attention.py"], "triton",
        "the forward / dQ treat the band's last, partial key tile as mask-free",
    ),
    Mutation(
        "top_left_alignment_torch", "sft_kernels/window.py",
        "    i = torch.arange(start, stop, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)",
        "    i = torch.arange(start, stop, device=device).unsqueeze(1)",
        ["tests/test_attention.py"], "torch_path",
        "the PyTorch path masks with top-left alignment when seqlen_q != seqlen_k",
    ),
    # ------------------------------------------------------------------ heads, rows, gradients
    Mutation(
        "gqa_head_mapping_triton", f"{ATT}/triton_jit.py",
        "        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, BLOCK_M, IS_VARLEN)\n    off_hk = off_h // group\n",
        "        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, BLOCK_M, IS_VARLEN)\n"
        "    off_hk = off_h % (tl.num_programs(1) // group)\n",
        ["tests/test_attention.py"], "triton",
        "the forward and dQ (their shared prologue) map query head h to kv head h % heads_kv instead of h // group",
    ),
    Mutation(
        "gqa_head_mapping_torch", f"{ATT}/torch_impl.py",
        "    return x[:, qs:qe].to(dtype).view(b, c, hkv, h // hkv, d).permute(0, 2, 3, 1, 4)",
        "    return x[:, qs:qe].to(dtype).view(b, c, h // hkv, hkv, d).permute(0, 3, 2, 1, 4)",
        ["tests/test_attention.py"], "torch_path",
        "the PyTorch path groups query heads h % heads_kv with a kv head",
    ),
    Mutation(
        "empty_row_lse_zero_torch", f"{ATT}/torch_impl.py",
        "    for qs, qe, lo, hi, _, _, s, _ in _scored_chunks(",  # rows of chunks with keys are overwritten
        "    lse[:, :, :, r0:r1] = 0.0\n    for qs, qe, lo, hi, _, _, s, _ in _scored_chunks(",
        ["tests/test_attention.py"], "torch_path",
        "LSE 0 instead of -inf where a whole query chunk sees no key (Lq - Lk > 128)",
    ),
    Mutation(
        "empty_row_lse_zero_triton", f"{ATT}/triton_jit.py",
        '    lse = tl.where(empty, float("-inf"), (m_i',
        "    lse = tl.where(empty, 0.0, (m_i",
        ["tests/test_attention.py"], "triton",
        "the Triton forward writes LSE 0 for rows that see no key",
    ),
    Mutation(
        "dk_dv_swapped_triton", f"{ATT}/triton_kernels.py",
        "    return dq, dk, dv, dsinks\n",
        "    return dq, dv, dk, dsinks\n",
        ["tests/test_attention.py"], "triton",
        "the Triton backward returns dV as dK and dK as dV",
    ),
    Mutation(
        "dk_dv_swapped_torch", f"{ATT}/torch_impl.py",
        "    return dq, dk.to(k.dtype), dv.to(v.dtype)",
        "    return dq, dv.to(k.dtype), dk.to(v.dtype)",
        ["tests/test_attention.py"], "torch_path",
        "the PyTorch backward swaps dK and dV",
    ),
    Mutation(
        "no_delta_triton", f"{ATT}/triton_jit.py",
        "        dsT = pT * (dpT - delta[None, :])",
        "        dsT = pT * dpT",
        ["tests/test_attention.py"], "triton",
        "dK forgets the softmax correction delta = rowsum(dO * O)",
    ),
    Mutation(
        "gqa_dkdv_first_head_only", f"{ATT}/triton_jit.py",
        "    for g in range(0, group):",
        "    for g in range(0, 1):",
        ["tests/test_attention.py"], "triton",
        "dK / dV of a kv head sum only its first query head",
    ),
    Mutation(
        "dq_scale_missing_torch", f"{ATT}/torch_impl.py",
        "        dq[:, qs:qe] = _to_rows(torch.matmul(ds, kr).mul_(scale), b, hkv, g, c)",
        "        dq[:, qs:qe] = _to_rows(torch.matmul(ds, kr), b, hkv, g, c)",
        ["tests/test_attention.py"], "torch_path",
        "dQ misses the softmax scale",
    ),
    # ------------------------------------------------------------------ PyTorch path: scheduling, empty input
    Mutation(
        "backward_one_phase_torch", f"{ATT}/torch_impl.py",
        "                phases[n % 2].append((i, r0, min(r0 + tall, s.lq)))",
        "                phases[0].append((i, r0, min(r0 + tall, s.lq)))",
        ["tests/test_torch_path.py"], "plan",
        "the backward runs neighbouring row groups together: concurrent adds into the same dK/dV rows",
    ),
    Mutation(
        "row_groups_ignore_window_torch", f"{ATT}/torch_impl.py",
        "                tall = r * max(1, math.ceil((s.left + s.right) / r))",
        "                tall = r",
        ["tests/test_torch_path.py"], "plan",
        "backward row groups one chunk tall whatever the window: groups two apart share dK/dV rows",
    ),
    Mutation(
        "task_head_slice_torch", f"{ATT}/torch_impl.py",
        "    per = heads // hkv\n",
        "    per = 1\n",
        ["tests/test_torch_path.py"], "pooled",
        "a task slices query heads with its kv-head range (GQA: the wrong query heads)",
    ),
    Mutation(
        "workers_keep_intra_op_team_torch", f"{ATT}/torch_impl.py",
        "    torch.set_num_threads(1)  # its ops run single-threaded: no OpenMP team, no barrier\n",
        "",
        ["tests/test_torch_path.py"], "single_threaded",
        "the pool's workers run their ops with the intra-op team (the stall under a competing process)",
    ),
    Mutation(
        "workers_record_autograd_torch", f"{ATT}/torch_impl.py",
        "    with torch.no_grad():  # a worker thread has its own grad mode; the inputs may require grad\n        fn(task)",
        "    fn(task)",
        ["tests/test_torch_path.py"], "single_threaded",
        "worker threads record autograd graphs on inputs that require grad",
    ),
    Mutation(
        "batch0_crash_torch", f"{ATT}/torch_impl.py",
        "        if q.numel() and k.numel():\n            left, right = spec.resolve(lk)\n            _forward(",
        "        if True:\n            left, right = spec.resolve(lk)\n            _forward(",
        ["tests/test_empty_inputs.py"], "padded_empty and torch",
        "the PyTorch forward runs its chunk loop on a batch of 0 (issue 16's reshape error)",
    ),
    Mutation(
        "empty_input_reaches_launcher", f"{ATT}/op.py",
        "    if q.numel() == 0 or k.numel() == 0:\n        # batch 0, no query or no key tokens",
        "    if False:\n        # batch 0, no query or no key tokens",
        ["tests/test_empty_inputs.py"], "launches_no_kernel",
        "op.py hands an empty input to the Triton / CUDA launchers",
    ),
    # ------------------------------------------------------------------ block-diagonal matmul
    Mutation(
        "bias_grad_wrong_dim", f"{BD}/torch_impl.py",
        "        return grad.sum(0, dtype=torch.float32).to(grad.dtype)\n    return grad.sum(0)",
        "        return grad.sum(0, dtype=torch.float32).to(grad.dtype)\n    return grad.sum(0) / grad.shape[0]",
        ["tests/test_block_diag.py", "tests/test_block_diagonal_linear.py"], None,
        "the bias gradient averages over tokens instead of summing (fp32/fp64)",
    ),
    Mutation(
        "bias_grad_half_dropped", f"{BD}/torch_impl.py",
        "        return grad.sum(0, dtype=torch.float32).to(grad.dtype)",
        "        return grad[1:].sum(0, dtype=torch.float32).to(grad.dtype)",
        ["tests/test_block_diag.py"], None,
        "the fp16/bf16 bias gradient skips the first token",
    ),
    # ------------------------------------------------------------------ Hugging Face window mapping
    Mutation(
        "hf_window_plus_one", "sft_kernels/integrations/transformers/convert.py",
        "def hf_layer_window(attention_module: nn.Module, config) -> Optional[int]:",
        "def hf_layer_window(attention_module: nn.Module, config) -> Optional[int]:\n"
        "    w = _hf_layer_window(attention_module, config)\n    return None if w is None else w + 1\n\n\n"
        "def _hf_layer_window(attention_module: nn.Module, config) -> Optional[int]:",
        ["tests/test_transformers_integration.py", "tests/test_sft_attention.py"], None,
        "a model's sliding_window=W read as W + 1 keys",
    ),
    Mutation(
        "hf_bidirectional_window_one_wider", "sft_kernels/integrations/transformers/convert.py",
        "    return (keys - 1, keys - 1)",
        "    return (keys, keys - 1)",
        ["tests/test_hf_matrix.py"], "gemma3",
        "a bidirectional layer's window of W keys read as W + 1 on the left",
    ),
    # ------------------------------------------------------------------ CUDA: barrier placement
    Mutation(
        "cuda_prefetch_before_barrier", "sft_kernels/csrc/mma.cuh",
        "    cp_async_wait_all();\n    __syncthreads();  // stage `it` landed; every warp is done with the other buffer\n"
        "    if (it + 1 < n) issue(it + 1, buf ^ 1);\n",
        "    if (it + 1 < n) issue(it + 1, buf ^ 1);\n    cp_async_wait_all();\n"
        "    __syncthreads();  // stage `it` landed; every warp is done with the other buffer\n",
        ["tests/test_cuda_build.py"], "emulated",
        "the shared cp.async pipeline (the loop of the forward, dK/dV, dQ and block-diagonal kernels) prefetches "
        "the next stage into the buffer other warps may still read",
    ),
    Mutation(
        "delta_from_partial_keys_torch", f"{ATT}/torch_impl.py",
        "        delta = doc.mul(_q_chunk(out, qs, qe, hkv, cdt)).sum(-1, keepdim=True)  # rowsum(dO * O)",
        "        delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)",
        ["tests/test_context_parallel.py"], "op_float64",
        "the PyTorch backward takes delta over the keys of its call, not from the given out (halo parts)",
    ),
    Mutation(
        "sft_attention_empty_batch_mask", "sft_kernels/modules/sft_attention.py",
        "            if valid.numel() == 0:",
        "            if False:",
        ["tests/test_empty_inputs.py"], "sft_attention",
        "SFTAttention unpads an empty batch with a mask",
    ),
    # ------------------------------------------------------------------ the exchange per layer (parallel/hybrid.py)
    Mutation(
        "hybrid_choice_inverted", "sft_kernels/parallel/hybrid.py",
        "    return ULYSSES if ulysses < max(halo) else HALO",
        "    return ULYSSES if ulysses > max(halo) else HALO",
        ["tests/test_hybrid_context_parallel.py"], "layout or tie",
        "the per-layer choice takes the exchange that sends more",
    ),
    Mutation(
        "hybrid_ulysses_bytes_forward_only", "sft_kernels/parallel/hybrid.py",
        "    heads_part = 2 * (2 * heads + 2 * kv) * batch",
        "    heads_part = (2 * heads + 2 * kv) * batch",
        ["tests/test_hybrid_context_parallel.py"], "layout",
        "Ulysses' bytes count the forward all-to-alls only",
    ),
    Mutation(
        "hybrid_ulysses_bytes_no_kv_replication", "sft_kernels/parallel/hybrid.py",
        "    kv = kv_heads * max(1, world // kv_heads)",
        "    kv = kv_heads",
        ["tests/test_hybrid_context_parallel.py"], "layout",
        "Ulysses' bytes leave out DeepSpeed's K/V head replication up to P",
    ),
    Mutation(
        "hybrid_halo_bytes_forward_only", "sft_kernels/parallel/hybrid.py",
        "            total += rows * (plan.rows_sent() + plan.rows_returned()) * row",
        "            total += rows * plan.rows_sent() * row",
        ["tests/test_hybrid_context_parallel.py"], "layout or sliding_layer",
        "the halo's bytes leave out the dK/dV returned in the backward",
    ),
    Mutation(
        "hybrid_packed_halo_bytes_forward_only", "sft_kernels/parallel/hybrid.py",
        "            out[r] += (plan.rows_sent() + plan.rows_received()) * row",
        "            out[r] += plan.rows_sent() * row",
        ["tests/test_hybrid_context_parallel.py"], "packed_rows_send",
        "the packed-row halo's bytes leave out the dK/dV returned in the backward",
    ),
    Mutation(
        "hybrid_halo_bytes_one_row", "sft_kernels/integrations/transformers/context_parallel.py",
        "        windows = {resolved_window(window, causal, total): b}",
        "        windows = {resolved_window(window, causal, total): 1}",
        ["tests/test_hybrid_context_parallel.py"], "P6 and (sends_less or counted)",
        "a layer's halo bytes counted for one row of the batch: P = 6 full layers stay on the halo",
    ),
    Mutation(
        "packed_two_sided_alignment_kept", "sft_kernels/parallel/packed.py",
        "        groups.setdefault((left + h_r, right - h_r), []).append(",
        "        groups.setdefault((left, right), []).append(",
        ["tests/test_packed_context_parallel.py"], "forward_and_gradients",
        "a packed piece with a right halo keeps the kernels' bottom-right alignment (queries h_r keys late)",
    ),
    Mutation(
        "packed_right_halo_one_short", "sft_kernels/parallel/packed.py",
        "        h = min(wins[j][1], cu[j + 1] - end) if r < world - 1 else 0",
        "        h = min(wins[j][1] - 1, cu[j + 1] - end) if r < world - 1 else 0",
        ["tests/test_packed_context_parallel.py"], "forward_and_gradients or own_keys",
        "the packed right halo one key short of the window",
    ),
    Mutation(
        "train_offload_context_not_entered", "sft_kernels/train/loop.py",
        "            with offload:  # the backward must run inside",
        "            with contextlib.nullcontext():  # the backward must run inside",
        ["tests/test_tiled_loss_train.py"], "offload",
        "--offload_checkpoints builds DeepSpeed's offload context but never enters it",
    ),
    Mutation(
        "accelerate_exchange_keeps_alst_entry", "sft_kernels/parallel/alst.py",
        "    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = sft_attention_forward  # ALST's entry replaced",
        "    pass",
        ["tests/test_alst.py"], "runs_this_backends",
        "alst_parallelism_config(exchange='halo') leaves ALST's all-to-all entry in place",
    ),
    Mutation(
        "adapter_keeps_flattening_keys", "sft_kernels/parallel/alst.py",
        "        register()\n    _adapter_drops_flattening_keys()\n",
        "        register()\n",
        ["tests/test_trl_sft_alst.py"], None,
        "DeepSpeed's data adapter is handed TRL's 1-D cu_seq_lens (IndexError when it shards them)",
    ),
    # ------------------------------------------------------------------ softcap and sinks
    Mutation(
        "softcap_grad_missing_torch", f"{ATT}/torch_impl.py",
        "            ds.mul_(cap_grad)  # d(c tanh(s / c)) / ds",
        "            pass  # d(c tanh(s / c)) / ds",
        ["tests/test_attention.py"], "torch and (softcap or property)",
        "the PyTorch backward leaves out the cap's derivative 1 - tanh^2",
    ),
    Mutation(
        "softcap_grad_missing_triton", f"{ATT}/triton_jit.py",
        "            ds = ds * _softcap_grad(p, lse[:, None], qk_scale)",
        "            ds = ds",
        ["tests/test_attention.py"], "triton and softcap",
        "the Triton dQ kernel leaves out the cap's derivative",
    ),
    Mutation(
        "tanh_not_odd_triton", f"{ATT}/triton_jit.py",
        "    return tl.where(x < 0, -t, t)",
        "    return t",
        ["tests/test_attention.py"], "triton and softcap",
        "the Triton tanh returns |tanh| (negative scores capped to positive ones)",
    ),
    Mutation(
        "sink_not_in_denominator_torch", f"{ATT}/torch_impl.py",
        "            l = l + torch.exp(sink - m)",
        "            l = l",
        ["tests/test_attention.py"], "torch and (sink or property)",
        "the PyTorch forward takes the sink into the running max but not into the denominator",
    ),
    Mutation(
        "sink_not_in_denominator_triton", f"{ATT}/triton_jit.py",
        "        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)",
        "        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)",
        ["tests/test_attention.py"], "triton and sink",
        "the Triton forward starts the denominator at 0 instead of the sink's exp(sink - m) = 1",
    ),
    Mutation(
        "dsinks_sign_torch", f"{ATT}/torch_impl.py",
        "    return -(p_sink * delta).sum(dims).to(sinks.dtype)",
        "    return (p_sink * delta).sum(dims).to(sinks.dtype)",
        ["tests/test_attention.py"], "torch and sink",
        "the PyTorch sinks gradient has the wrong sign",
    ),
    Mutation(
        "dsinks_sign_triton", f"{ATT}/triton_jit.py",
        "-tl.sum(p_sink * pdp, 0))",
        "tl.sum(p_sink * pdp, 0))",
        ["tests/test_attention.py"], "triton and sink",
        "the Triton sinks gradient has the wrong sign",
    ),
    Mutation(
        "hf_sinks_dropped", "sft_kernels/integrations/transformers/backend.py",
        '        mods["sinks"] = kwargs["s_aux"]',
        "        pass",
        ["tests/test_hf_matrix.py"], "gpt",
        "the Hugging Face backend drops GPT-OSS's s_aux sinks",
    ),
    Mutation(
        "hf_softcap_dropped", "sft_kernels/integrations/transformers/backend.py",
        '        mods["softcap"] = float(kwargs["softcap"])',
        "        pass",
        ["tests/test_hf_matrix.py"], "softcap",
        "the Hugging Face backend drops Gemma2's attention logit softcap",
    ),
    # ------------------------------------------------------------------ tile edges (issue 20)
    # Each bites only where the band's edge sits on a tile boundary (left - (Lk - Lq) = 1 mod
    # a tile), so the select is the fixed tile-edge cases alone: they must catch it, not a
    # lucky property draw.
    Mutation(
        "dkdv_query_range_one_short_cuda", "sft_kernels/csrc/swa_window.cuh",
        "  if (left >= 0) hi = min(max(start_n + BN - off + left, 0), len_q);",
        "  if (left >= 0) hi = min(max(start_n + BN - 1 - off + left, 0), len_q);",
        ["tests/test_cuda_build.py"], "emulated",
        "the dK/dV query range ends one row short: a key per tile loses a row where left - off = 1 mod BM",
    ),
    Mutation(
        "dkdv_query_range_one_short_triton", f"{ATT}/triton_jit.py",
        "        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - off + left, 0), seqlen_q)",
        "        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - off + left, 0), seqlen_q)",
        ["tests/test_attention.py"], "tile_edges and triton",
        "as above, in the Triton dK/dV kernel (_query_phases)",
    ),
    Mutation(
        "key_range_start_one_tile_late_triton", f"{ATT}/triton_jit.py",
        "        lo = tl.maximum(start_m + off - left, 0)",
        "        lo = tl.maximum(start_m + off - left + 1, 0)",
        ["tests/test_attention.py"], "tile_edges and triton",
        "the forward / dQ key range starts a tile late where left - off = 1 mod BLOCK_N (_key_phases)",
    ),
    Mutation(
        "key_range_start_one_tile_late_cuda", "sft_kernels/csrc/swa_window.cuh",
        "  if (left >= 0) lo = max(start_m + off - left, 0);",
        "  if (left >= 0) lo = max(start_m + off - left + 1, 0);",
        ["tests/test_cuda_build.py"], "emulated",
        "as above, in the CUDA forward / dQ (key_phases)",
    ),
    Mutation(
        "key_range_start_one_chunk_late_torch", f"{ATT}/torch_impl.py",
        "        lo = 0 if left < 0 else max(0, qs + off - left)",
        "        lo = 0 if left < 0 else max(0, qs + off - left + 1) // rows * rows",
        ["tests/test_attention.py"], "tile_edges and torch_path",
        "a chunk's key range aligned to whole chunks from a start one key late: a chunk late where "
        "left - off = 1 mod CHUNK",
    ),
    Mutation(
        "int_window_centre_swapped_triton", f"{ATT}/triton_jit.py",
        "            lw = w // 2\n            rw = (w - 1) // 2",
        "            lw = (w - 1) // 2\n            rw = w // 2",
        ["tests/test_attention.py"], "tile_edges and triton",
        "the Triton kernels put an even non-causal int window's extra key on the right",
    ),
    Mutation(
        "int_window_centre_swapped_cuda", "sft_kernels/csrc/swa_window.cuh",
        "  return {w / 2, (w - 1) / 2};",
        "  return {(w - 1) / 2, w / 2};",
        ["tests/test_cuda_build.py"], "emulated",
        "the CUDA kernels put an even non-causal int window's extra key on the right",
    ),
    Mutation(
        "int_window_centre_swapped_fixed_cases", "sft_kernels/window.py",
        "    return w // 2, (w - 1) // 2",
        "    return (w - 1) // 2, w // 2",
        ["tests/test_attention.py"], "tile_edges and torch_path",
        "int_window_centre_swapped, held to the fixed cases alone (the entry above lets a property draw catch it)",
    ),
    Mutation(
        "padding_hole_unchecked_when_compiled", "sft_kernels/modules/padding.py",
        '        torch._assert_async((blocks <= 1).all(), f"{name} has padding between tokens")\n',
        "",
        ["tests/test_sft_attention.py"], "hole",
        "under torch.compile the padding check returns without its device-side assertion",
    ),
    # ------------------------------------------------------------------ sft-kernels train
    Mutation(
        "train_cp_label_count_unshifted", "sft_kernels/train/context_parallel.py",
        "int((labels[:, 1:] != IGNORE_INDEX).sum())",
        "int((labels != IGNORE_INDEX).sum())",
        ["tests/test_train_context_parallel.py"], "round_robin",
        "context parallel: a micro-batch's label tokens counted before the shift (each row's first token too)",
    ),
    Mutation(
        "train_cp_loss_not_scaled", "sft_kernels/train/context_parallel.py",
        "        return loss * self.size, shown.item()",
        "        return loss, shown.item()",
        ["tests/test_train_context_parallel.py"], "step_losses and halo-zero2",
        "context parallel: each rank backpropagates l_j, not N l_j (DeepSpeed's average leaves gradients 1/N)",
    ),
    # ------------------------------------------------------------------ the step's memory (issue 22)
    Mutation(
        "tiled_mlp_no_compute_params", "sft_kernels/modules/tiled_mlp.py",
        "    params = [p for p in self.parameters()]",
        "    params = []",
        ["tests/test_tiled_mlp_zero3.py"], None,
        "TiledMLP given no compute_params: under ZeRO-3 every piece's gradient goes to the reduce bucket",
    ),
    Mutation(
        "tile_budget_in_elements", "sft_kernels/modules/linear_cross_entropy.py",
        "    return max(1, int(tile_bytes) // (4 * int(vocab)))",
        "    return max(1, int(tile_bytes) // int(vocab))",
        ["tests/test_tiled_loss_hf.py"], "tile_bytes",
        "the logits tile's byte budget read as elements: fp32 tiles four times the budget",
    ),
    Mutation(
        "offload_threshold_in_mib", "sft_kernels/modules/activation_offload.py",
        "min_offload_bytes=int(min_offload_bytes),",
        "min_offload_bytes=int(min_offload_bytes) << 20,",
        ["tests/test_activation_offload.py"], "copy_path",
        "checkpoint offload's size threshold read as MiB: no checkpoint of a small model is offloaded",
    ),
]


def _tree_files() -> List[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]


def _copy_tree(dst: str, files: List[str]) -> None:
    for rel in files:
        target = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def _pytest(tree: str, m: Optional[Mutation], timeout: int):
    tests = m.tests if m else sorted({t for mu in MUTATIONS for t in mu.tests})
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
           "-m", "not slow and not gpu", *tests]
    if m and m.select:
        cmd += ["-k", m.select]
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    try:
        res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        return res.returncode, res.stdout[-3000:] + res.stderr[-2000:], time.time() - start
    except subprocess.TimeoutExpired:
        return None, "timed out", time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="run the mutations whose name contains one of these words")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=3600, help="per mutation, seconds (default 3600)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:42s} {m.note}")
        return 0
    files = _tree_files()
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="sftk-mut-") as tmp:
        if not args.no_baseline:
            base = os.path.join(tmp, "baseline")
            _copy_tree(base, files)
            print("baseline (no mutation) ...", flush=True)
            rc, log, secs = _pytest(base, None if not args.only else _merged(chosen), args.timeout)
            if rc != 0:
                print(f"the unmutated tree fails its tests (rc {rc}); fix that first:\n{log}")
                return 1
            print(f"baseline passes ({secs:.0f} s)", flush=True)
        for m in chosen:
            tree = os.path.join(tmp, m.name)
            _copy_tree(tree, files)
            path = os.path.join(tree, m.path)
            src = open(path).read()
            if src.count(m.old) != m.count:
                rows.append((m, "STALE", 0.0))
                failed = True
                print(f"{m.name}: STALE (the code it mutates occurs {src.count(m.old)} times in {m.path}, "
                      f"expected {m.count})", flush=True)
                shutil.rmtree(tree)
                continue
            open(path, "w").write(src.replace(m.old, m.new))
            rc, log, secs = _pytest(tree, m, args.timeout)
            if rc is None:
                verdict = "caught (timeout)"
            elif rc == 5:
                verdict, failed = "NO TESTS", True
            elif rc == 0:
                verdict, failed = "SURVIVED", True
            else:
                verdict = "caught"
            rows.append((m, verdict, secs))
            print(f"{m.name}: {verdict} ({secs:.0f} s)", flush=True)
            if verdict in ("SURVIVED", "NO TESTS"):
                print(log)
            shutil.rmtree(tree)
    print("\n| mutation | what | result | s |\n|---|---|---|---|")
    for m, verdict, secs in rows:
        print(f"| {m.name} | {m.note} | {verdict} | {secs:.0f} |")
    caught = sum(1 for _, v, _ in rows if v.startswith("caught"))
    print(f"\n{caught} of {len(rows)} mutations caught")
    return 1 if failed else 0


def _merged(ms: List[Mutation]) -> Mutation:
    """The tests of the chosen mutations as one run, for the baseline."""
    return Mutation("baseline", "", "", "", sorted({t for m in ms for t in m.tests}))


if __name__ == "__main__":
    sys.exit(main())
