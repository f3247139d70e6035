"""A memory model of one training step: bytes per component, the longest trainable length, and
the attention FLOPs of a step. Everything here is *modelled* (arithmetic on shapes); the figures
that check it are *measured* by :mod:`sft_kernels.bench.memory` (``tests/test_memory_model.py``
holds the model to the committed CPU measurements within 15%).

Per rank, batch 1, transformers' gradient checkpointing (one checkpoint per layer), T = L / P
tokens per rank under P-way context parallelism, N data-parallel ranks for ZeRO:

  model states   weights w, gradients g, optimizer s bytes per parameter: bf16 mixed precision
                 w = g = 2, s = 12 (fp32 master + Adam m, v); fp32 (the CPU benchmark) w = g = 4,
                 s = 8. ZeRO 0: (w+g+s) P; 1: (w+g) P + s P/N; 2: w P + (g+s) P/N; 3: (w+g+s) P/N.
                 offload_optimizer: s P (or s P/N) in CPU memory instead
  checkpoints    layers x T x H x b (each layer's input kept by checkpointing), b = activation bytes;
                 0 on the GPU with offload_checkpoints (ALST's checkpoint offload to CPU)
  recompute      one layer rebuilt in the backward, its saved activations:
                 T b (4 H + 3 heads d + 4 kv d) for attention, T b 4 I for the gated MLP (or
                 c_mlp b 4 I with the tiled MLP, chunk c_mlp). Counting their gradients as well
                 (2x) over-predicted the CPU measurement at L = 8k by 35%: the factor 1 is set
                 from that measurement, not derived
  attention      the kernel's own working set, O(T): log-sum-exp per head, 4 T heads bytes (the
                 band itself is never stored: O(L w) compute, O(L) memory)
  logits         full: T V (b + 4 + 4 + b) (logits, their fp32 copy, fp32 and model-dtype
                 gradients; fp32 models: 3 x 4 T V); tiled: the same for c_loss tokens, plus the
                 fp32 weight-gradient accumulator V H 4 of the own path
  hidden grads   3 T H b (the gradient flowing between layers, its checkpoint's gradient, the
                 final norm's)

The peak (:func:`peak_bytes`) is model states + checkpoints + hidden grads + the larger of logits
and recompute + attention: the loss runs before the layers' backward, and each is freed before
the other's peak (measured: summing them over-predicts the CPU peak of HF sdpa at L = 4k by 15%).

Not modelled: the allocator's fragmentation and caching, CUDA context and workspaces (a fixed
``reserve_gib``, default 4 GiB on a GPU), communication buffers, ZeRO-3's gathered layer (a few hundred MiB),
host memory, the time offload costs, sequence packing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

GIB = 2**30
RECOMPUTE_FACTOR = 1  # see step_bytes: set from the CPU measurement at L = 8k (2 over-predicted by 35%)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    window: Optional[int] = None          # sliding window (keys including self); None: full causal
    window_every: int = 1                 # 2: every other layer slides (Gemma 2), the rest are full
    tied: bool = False

    def parameters(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


LLAMA3_8B = Shape("Llama-3-8B", 4096, 32, 32, 8, 128, 14336, 128256)
MISTRAL_7B = Shape("Mistral-7B (window 4096)", 4096, 32, 32, 8, 128, 14336, 32000, window=4096)
GEMMA2_9B = Shape("Gemma-2-9B", 3584, 42, 16, 8, 256, 14336, 256000, window=4096, window_every=2, tied=True)
SHAPES = (LLAMA3_8B, MISTRAL_7B, GEMMA2_9B)
# ALST (Arctic Long Sequence Training, arXiv 2506.13996): Llama-8B, published maximum lengths
ALST_PUBLISHED = {1: 500_000, 8: 3_700_000}


def step_bytes(shape: Shape, seqlen: int, *, dtype_bytes: int = 2, mixed_precision: bool = True, zero: int = 3,
               data_parallel: int = 1, context_parallel: int = 1, tiled_loss: bool = True, tiled_mlp: bool = True,
               loss_chunk: int = 4096, mlp_chunk: int = 4096, offload_optimizer: bool = False,
               offload_checkpoints: bool = False) -> Dict[str, float]:
    """Bytes per rank of each component (module docstring) for one step at ``seqlen`` tokens."""
    b = dtype_bytes
    p = shape.parameters()
    w, g, s = (2, 2, 12) if mixed_precision else (dtype_bytes, dtype_bytes, 8)
    n = max(1, data_parallel)
    states = {0: (w + g + s) * p, 1: (w + g) * p + s * p / n, 2: w * p + (g + s) * p / n,
              3: (w + g + s) * p / n}[zero]
    if offload_optimizer:  # ZeRO-Offload: optimizer states (and fp32 master) in CPU memory
        states -= {0: s * p, 1: s * p / n, 2: s * p / n, 3: s * p / n}[zero]
    t = math.ceil(seqlen / context_parallel)
    h, d = shape.hidden, shape.head_dim
    # one layer's saved activations, once: their gradients are made and freed one op at a time (the
    # first version counted them twice, all live, and over-predicted the measured CPU peak at L = 8k
    # with the untiled MLP by 35%; once: within 1%)
    attn_work = RECOMPUTE_FACTOR * t * b * (4 * h + 3 * shape.heads * d + 4 * shape.kv_heads * d)
    mlp_tokens = min(t, mlp_chunk) if tiled_mlp else t
    mlp_work = RECOMPUTE_FACTOR * mlp_tokens * b * 4 * shape.intermediate
    logit_bytes = (b + 4 + 4 + b) if b != 4 else 12
    if tiled_loss:
        logits = min(t, loss_chunk) * shape.vocab * logit_bytes + shape.vocab * h * 4
    else:
        logits = t * shape.vocab * logit_bytes
    return {
        "model_states": states,
        "checkpoints": 0 if offload_checkpoints else shape.layers * t * h * b,
        "recompute": attn_work + mlp_work,
        "attention": 4 * t * shape.heads,
        "logits": logits,
        "hidden_grads": 3 * t * h * b,
    }


def peak_bytes(parts: Dict[str, float]) -> float:
    """The step's peak: the loss phase (logits) and the layer-by-layer backward (recompute,
    attention) come one after the other, so the larger of them counts, over what the whole step
    holds (model states, checkpoints, hidden-state gradients)."""
    return (parts["model_states"] + parts["checkpoints"] + parts["hidden_grads"]
            + max(parts["logits"], parts["recompute"] + parts["attention"]))


def max_length(shape: Shape, gpu_gib: float = 80, reserve_gib: float = 4, **kw) -> int:
    """The longest L whose modelled step fits ``gpu_gib - reserve_gib`` per rank (0: none)."""
    budget = (gpu_gib - reserve_gib) * GIB
    if peak_bytes(step_bytes(shape, 1, **kw)) > budget:
        return 0
    lo, hi = 1, 1 << 10
    while peak_bytes(step_bytes(shape, hi, **kw)) <= budget and hi < 1 << 34:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak_bytes(step_bytes(shape, mid, **kw)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def attention_flops(shape: Shape, seqlen: int, window: Optional[int] = None, checkpointing: bool = True) -> float:
    """Attention FLOPs of one step (all layers, batch 1): forward ``4 sum_q(keys seen) d heads``,
    backward 2.5x forward, one more forward with checkpointing. ``window``: override the shape's."""
    window = shape.window if window is None else window

    def keys_seen(w):
        if w is None or w >= seqlen:
            return seqlen * (seqlen + 1) / 2
        return w * (w + 1) / 2 + (seqlen - w) * w

    per_layer_full = 4 * keys_seen(None) * shape.head_dim * shape.heads
    per_layer_win = 4 * keys_seen(window) * shape.head_dim * shape.heads
    sliding = shape.layers if window else 0
    if window and shape.window_every > 1:
        sliding = shape.layers // shape.window_every
    fwd = sliding * per_layer_win + (shape.layers - sliding) * per_layer_full
    return fwd * (1 + 2.5 + (1 if checkpointing else 0))


SETUPS = (  # (GPUs, context parallel, tiled, offload optimizer, offload checkpoints, what)
    (1, 1, False, True, False, "ZeRO-3 + optimizer offload, full logits, plain MLP"),
    (1, 1, True, True, False, "ZeRO-3 + optimizer offload, tiled loss + MLP"),
    (1, 1, True, True, True, "as above + checkpoint offload (ALST's setup)"),
    (8, 8, False, True, False, "ZeRO-3 + optimizer offload, context parallel 8, untiled"),
    (8, 8, True, True, False, "ZeRO-3 + optimizer offload, context parallel 8, tiled"),
    (8, 8, True, True, True, "as above + checkpoint offload (ALST's setup)"),
)


def table(gpu_gib: float = 80) -> str:
    """Markdown: modelled maximum length and attention TFLOPs per step (per rank) at that length."""
    rows = ["| model | GPUs | setup | max L (modelled) | attention TFLOP per step per rank | ALST published |",
            "|---|---|---|---|---|---|"]
    for shape in SHAPES:
        for n, cp, tiled, off_opt, off_ckpt, what in SETUPS:
            L = max_length(shape, gpu_gib, data_parallel=n, context_parallel=cp, tiled_loss=tiled, tiled_mlp=tiled,
                           offload_optimizer=off_opt, offload_checkpoints=off_ckpt)
            flops = attention_flops(shape, L) / cp / 1e12 if L else 0
            alst = f"{ALST_PUBLISHED[n] / 1e6:.1f}M" if shape is LLAMA3_8B and off_ckpt else ""
            rows.append(f"| {shape.name} | {n} | {what} | {L / 1e3:,.0f}K | {flops:,.0f} | {alst} |")
    return "\n".join(rows)


def main() -> int:
    print(f"Modelled, not measured: one step, batch 1, bf16 mixed precision with Adam, gradient checkpointing, "
          f"80 GB GPUs less 4 GiB reserve, loss and MLP chunks 4096 tokens (sft_kernels/memory_model.py).\n")
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
