"""One rank of the context-parallel tests (run by tests/test_context_parallel.py, P processes, gloo).

Every rank builds the same global inputs from a seed, keeps its shard, runs the parallel
code, and compares with the single-process computation on the whole sequence; it writes
the relative errors (and the messages of the expected errors) to ``rank<r>.json``. The
oracle for the op is a dense float64 attention written here from the window table of the
README (independent of sft_kernels.window), for the layer and the training run a single
process holding the whole sequence.

argv: out_dir store_path run_triton(0/1)
"""

import datetime
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

out_dir, store_path, run_triton = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
# generous: on a loaded 2-core machine a peer can be descheduled for long stretches
dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=RANK, world_size=WORLD,
                        timeout=datetime.timedelta(seconds=900))

import sft_kernels  # noqa: E402
from sft_kernels import SFTAttention, context_parallel_attention  # noqa: E402
from sft_kernels.parallel import context_parallel_groups  # noqa: E402

torch.set_num_threads(1)
results, errors, timings = {}, {}, {}
progress = os.path.join(out_dir, f"progress{RANK}")


def beat(name):
    with open(progress, "w") as f:
        f.write(name)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d = float((a - b).norm())
    n = float(b.norm())
    return d / n if n > 0 else d


# ----------------------------------------------------------------------------- the oracle
def window_of(window_size, causal, L):
    """(left, right), -1 = unbounded: the README's window table, written out again."""
    if window_size == "sqrt":
        window_size = max(1, math.isqrt(L))
    if isinstance(window_size, int):
        w = min(window_size, L)
        return (w - 1, 0) if causal else (w // 2, (w - 1) // 2)
    left, right = window_size
    return (left, 0) if causal else (left, right)


def dense(q, k, v, left, right, scale):
    """float64 attention of (B, L, H, D) with an explicit band; returns out, lse (B, H, L)."""
    B, L, H, D = q.shape
    g = H // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    keep = torch.ones(L, L, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv)
    return out, lse


def shard(x, dim=1):
    n = x.shape[dim] // WORLD
    return x.narrow(dim, RANK * n, n)


# ----------------------------------------------------------------------------- the op
def op_case(name, n, window_size, causal, hq=4, hkv=2, d=8, b=2, scale=None, dtype=torch.float64, backend="torch",
            seed=0):
    beat(name)
    t0 = time.perf_counter()
    L = n * WORLD
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, L, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, L, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, L, hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, L, hq, d, generator=g, dtype=torch.float64)
    # oracle: the whole sequence in one process, float64
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    left, right = window_of(window_size, causal, L)
    out_ref, lse_ref = dense(qr, kr, vr, left, right, scale if scale is not None else d ** -0.5)
    (out_ref * do).sum().backward()
    # this rank's shard through context_parallel_attention
    qs, ks, vs = (shard(t).to(dtype).clone().requires_grad_(True) for t in (q, k, v))
    out, lse = context_parallel_attention(qs, ks, vs, window_size=window_size, causal=causal, softmax_scale=scale, backend=backend, return_lse=True)
    (out * shard(do).to(dtype)).sum().backward()
    res = {
        "out": rel(out, shard(out_ref)), "lse": rel(lse, shard(lse_ref, 2)),
        "dq": rel(qs.grad, shard(qr.grad)), "dk": rel(ks.grad, shard(kr.grad)), "dv": rel(vs.grad, shard(vr.grad)),
        "dtype_out": str(out.dtype),
    }
    if dtype in (torch.float16, torch.bfloat16):
        # FlashAttention's bar: at most twice the error of plain PyTorch in the same precision
        # on one process holding the whole sequence
        qd, kd, vd = (t.to(dtype).clone().requires_grad_(True) for t in (q, k, v))
        out_lp = sft_kernels.sliding_window_attention_reference(qd, kd, vd, window_size, causal, scale, upcast=False)[0]
        (out_lp * do.to(dtype)).sum().backward()
        res.update({"base_out": rel(shard(out_lp), shard(out_ref)), "base_dq": rel(shard(qd.grad), shard(qr.grad)),
                    "base_dk": rel(shard(kd.grad), shard(kr.grad)), "base_dv": rel(shard(vd.grad), shard(vr.grad))})
    results["op/" + name] = res
    timings["op/" + name] = time.perf_counter() - t0


P = WORLD
N = 7 if P == 2 else 5  # tokens per rank (odd on purpose); L = 14 or 20
OP_CASES = {
    # windows smaller than, equal to and larger than a shard (multi-hop), causal
    "causal-int-lt-shard": dict(window_size=N - 2, causal=True),
    "causal-int-eq-shard": dict(window_size=N, causal=True),          # left = N - 1: the whole previous shard but one
    "causal-left-eq-shard": dict(window_size=(N, 0), causal=True),    # left = N: exactly one whole shard
    "causal-multihop": dict(window_size=(2 * N + 2, 0), causal=True),  # spans 3 shards (cut at the start for P=2)
    "causal-int-beyond-L": dict(window_size=10 * N * P, causal=True),  # clamped to L
    "causal-unbounded": dict(window_size=(-1, -1), causal=True),
    "causal-sqrt": dict(window_size="sqrt", causal=True),
    # two-sided windows
    "twosided-small": dict(window_size=(3, 2), causal=False),
    "twosided-right-eq-shard": dict(window_size=(1, N), causal=False),
    "twosided-multihop": dict(window_size=(N + 2, 2 * N + 1), causal=False),
    "twosided-int": dict(window_size=N + 1, causal=False),
    "twosided-sqrt": dict(window_size="sqrt", causal=False),
    "full-attention": dict(window_size=(-1, -1), causal=False),
    "no-halo-window-0": dict(window_size=(0, 0), causal=False),
    # GQA / MQA / MHA, custom scale, batch 1, head_dim not a power of two
    "mqa-scale": dict(window_size=(N + 1, 0), causal=True, hq=4, hkv=1, scale=0.3),
    "mha-b1-d12": dict(window_size=(2, 3), causal=False, hq=2, hkv=2, d=12, b=1),
    # lower precision on the torch backend
    "fp32-multihop": dict(window_size=(N + 3, 2), causal=False, dtype=torch.float32),
    "bf16-causal": dict(window_size=N + 2, causal=True, dtype=torch.bfloat16, d=16),
}
for name, kw in OP_CASES.items():
    op_case(name, N, **kw)
if run_triton:  # the Triton kernels as the local kernel (interpreter on CPU): all three parts
    op_case("triton-fp32", N, window_size=(N + 1, 2), causal=False, dtype=torch.float32, backend="triton")


# ----------------------------------------------------------------------------- errors
def expect_error(name, fn):
    beat(name)
    try:
        fn()
        errors[name] = "no error"
    except (ValueError, TypeError) as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"


def t(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


expect_error("unequal-lengths", lambda: context_parallel_attention(
    t(1, N + (RANK == 0), 2, 8), t(1, N + (RANK == 0), 2, 8), t(1, N + (RANK == 0), 2, 8), window_size=3))
# L = P N + 1 split as evenly as possible: the group size does not divide L
_len = [len(c) for c in torch.arange(P * N + 1).tensor_split(P)][RANK]
expect_error("group-does-not-divide-L", lambda: context_parallel_attention(
    t(1, _len, 2, 8), t(1, _len, 2, 8), t(1, _len, 2, 8), window_size=3))
expect_error("window-differs", lambda: context_parallel_attention(
    t(1, N, 2, 8), t(1, N, 2, 8), t(1, N, 2, 8), window_size=3 if RANK == 0 else 4))
expect_error("heads-differ", lambda: context_parallel_attention(
    t(1, N, 2, 8), t(1, N, 2 if RANK == 0 else 1, 8), t(1, N, 2 if RANK == 0 else 1, 8), window_size=3))
expect_error("packed", lambda: context_parallel_attention(t(N, 2, 8), t(N, 2, 8), t(N, 2, 8), window_size=3))
expect_error("one-rank-bad-dtype", lambda: context_parallel_attention(
    *(torch.ones(1, N, 2, 8, dtype=torch.int64 if RANK == 1 else torch.float64) for _ in range(3)), window_size=3))
# the group still works after the errors (no rank left behind in a collective)
op_case("after-errors", N, window_size=(N + 1, 1), causal=False, seed=1)


# ----------------------------------------------------------------------------- the layer
def layer_case(name, kw, L, mask=None, groups=None, seed=0):
    """SFTAttention(context_parallel_group=...) on this rank's shard vs one process on all of it."""
    beat(name)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    groups = groups or dict(context_parallel_group=dist.group.WORLD)
    ref = SFTAttention(**kw)
    par = SFTAttention(**kw, **groups)
    par.load_state_dict(ref.state_dict())
    b = 2
    x = torch.randn(b, L, kw["hidden_size"])
    gy = torch.randn(b, L, kw["hidden_size"])
    xr = x.clone().requires_grad_(True)
    yr = ref(xr, attention_mask=mask)
    (yr * gy).sum().backward()
    xs = shard(x).clone().requires_grad_(True)
    ys = par(xs, attention_mask=None if mask is None else shard(mask))
    (ys * shard(gy)).sum().backward()
    errs = {"out": rel(ys, shard(yr)), "dx": rel(xs.grad, shard(xr.grad))}
    if mask is not None:
        pad = shard(mask) == 0
        errs["pad_rows_max"] = float(ys.detach()[pad].abs().max()) if pad.any() else 0.0
    for (pn, p), (_, pr) in zip(par.named_parameters(), ref.named_parameters()):
        gp = p.grad.clone()
        dist.all_reduce(gp)  # each rank holds the gradient of its own tokens
        errs["d" + pn] = rel(gp, pr.grad)
    results["layer/" + name] = errs
    timings["layer/" + name] = time.perf_counter() - t0


torch.set_default_dtype(torch.float64)
L = N * P
LAYER = {
    "gqa-int-window-bias": (dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=N + 3, bias=True), None),
    "sqrt-qkv-groups": (dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size="sqrt", qkv_groups=2), None),
    "twosided-norope": (dict(hidden_size=24, num_heads=2, head_dim=8, window_size=(N + 1, 3), causal=False,
                             rope_theta=None), None),
}
# right padding: row 0 loses its last 3 tokens (inside the last shard), row 1 everything after
# the first N + 2 tokens (later shards hold only padding)
pad_mask = torch.ones(2, L, dtype=torch.long)
pad_mask[0, L - 3:] = 0
pad_mask[1, N + 2:] = 0
LAYER["right-padding-int"] = (dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=4, bias=True), pad_mask)
# "sqrt" follows each row's real length: rows get different windows
LAYER["right-padding-sqrt"] = (dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size="sqrt"), pad_mask)
for name, (kw, mask) in LAYER.items():
    layer_case(name, kw, L, mask)

# Ulysses inside each context-parallel shard (2 x 2 on four ranks)
if P == 4:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch as ds_torch

    # DeepSpeed's CPU shared-memory all-reduce op is a JIT build in a cache shared by every venv on
    # the machine (measured: 10 s when cached, 100+ s when another install rebuilt it); Ulysses'
    # all-to-alls never use it
    ds_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    grid = context_parallel_groups(2, 2)
    assert grid.shard_index == RANK and grid.num_shards == 4 and grid.data_parallel_rank == 0
    g2 = dict(context_parallel_group=grid.context_parallel_group, sequence_parallel_group=grid.sequence_parallel_group)
    layer_case("ulysses-inside-int", dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=N + 4, bias=True),
               L, None, groups=g2)
    layer_case("ulysses-inside-padding-sqrt", dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size="sqrt"),
               L, pad_mask, groups=g2)

left_pad = torch.ones(2, L, dtype=torch.long)
left_pad[1, :N + 1] = 0
kw = dict(hidden_size=16, num_heads=2, window_size=4)
expect_error("layer-left-padding", lambda: SFTAttention(**kw, context_parallel_group=dist.group.WORLD)(
    shard(torch.randn(2, L, 16)), attention_mask=shard(left_pad)))
hole = torch.ones(2, L, dtype=torch.long)
hole[0, 1] = 0
expect_error("layer-hole", lambda: SFTAttention(**kw, context_parallel_group=dist.group.WORLD)(
    shard(torch.randn(2, L, 16)), attention_mask=shard(hole)))
expect_error("layer-twosided-padding", lambda: SFTAttention(
    **kw, causal=False, context_parallel_group=dist.group.WORLD)(shard(torch.randn(2, L, 16)),
                                                                 attention_mask=shard(pad_mask)))


# ----------------------------------------------------------------------------- training
class TinyLM(torch.nn.Module):
    def __init__(self, group=None, vocab=40, hidden=32, layers=2):
        super().__init__()
        par = {} if group is None else dict(context_parallel_group=group)
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(layers))
        self.attn = torch.nn.ModuleList(
            SFTAttention(hidden, 4, 2, window_size=N + 1, bias=True, **par) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, 64), torch.nn.SiLU(), torch.nn.Linear(64, hidden))
            for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        for norm, attn, mlp in zip(self.norms, self.attn, self.mlp):
            h = h + attn(norm(h), attention_mask=mask)
            h = h + mlp(h)
        return self.head(h)


def train(model, parallel, steps=4):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (2, L), generator=g)  # one batch, seen every step: the loss must fall
    losses = []
    for step in range(steps):
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, L - 1 - step:] = 0  # right padding that grows across the steps
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]  # shifted on the whole sequence, before slicing
        labels[mask == 0] = -100
        labels[:, :-1][mask[:, 1:] == 0] = -100
        count = int((labels != -100).sum())
        if parallel:
            logits = model(shard(ids), shard(mask))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shard(labels).flatten(), reduction="sum",
                                                     ignore_index=-100) / count
        else:
            logits = model(ids, mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                     ignore_index=-100) / count
        opt.zero_grad()
        loss.backward()
        value = loss.detach().clone()
        if parallel:
            for p in model.parameters():
                dist.all_reduce(p.grad)
            dist.all_reduce(value)
        losses.append(float(value))
        opt.step()
    return losses


beat("training")
t0 = time.perf_counter()
torch.manual_seed(3)
ref_model = TinyLM()
par_model = TinyLM(dist.group.WORLD)
par_model.load_state_dict(ref_model.state_dict())
ref_losses = train(ref_model, False)
par_losses = train(par_model, True)
param_err = max(rel(p, r) for p, r in zip(par_model.parameters(), ref_model.parameters()))
results["training"] = {"losses_ref": ref_losses, "losses_par": par_losses, "param_err": param_err}
timings["training"] = time.perf_counter() - t0

beat("done")
with open(os.path.join(out_dir, f"rank{RANK}.json"), "w") as f:
    json.dump({"results": results, "errors": errors, "timings": timings}, f, indent=1)
dist.barrier()
dist.destroy_process_group()
# Skip the interpreter's teardown: about 1 run in 30 on the loaded CI machine, gloo's exit-time
# destructors abort a rank ("terminate called without an active exception") after all work is
# done and written. Everything above has finished and been flushed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
