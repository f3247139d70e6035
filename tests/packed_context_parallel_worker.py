"""One rank of tests/test_packed_context_parallel.py (4 processes, gloo): one packed row of 32
tokens split into shards of 8, several sequences per row, through
``sft_kernels.parallel.packed.context_parallel_packed_attention``, causal and two-sided windows.

Oracle: the dense float64 reference (``sft_kernels/ops/sliding_window_attention/reference.py``)
run by this process on each whole sequence alone, forward and backward with the same upstream
gradient; each rank compares its rows of the output and of dq, dk, dv (halo gradients returned to
their owners). Writes the relative errors, the controls and the exchange plans to ``rank<r>.json``.

argv: out_dir
"""

import json
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)

from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference  # noqa: E402
from sft_kernels.parallel import context_parallel_attention  # noqa: E402
from sft_kernels.parallel.packed import context_parallel_packed_attention, packed_halo_plan  # noqa: E402

L, H, HKV, D = 32, 4, 2, 8
N = L // WORLD
LO, HI = RANK * N, (RANK + 1) * N
LAYOUTS = {  # cu_seqlens of the row
    "inside-and-one-boundary": [0, 3, 8, 22, 32],  # 0-2 and 3-7 inside shard 0; 8-21 crosses 16; 22-31 crosses 24
    "several-boundaries": [0, 2, 29, 32],  # 2-28 crosses 8, 16 and 24
    "aligned": [0, 8, 16, 24, 32],  # every sequence one shard: nothing to exchange
}
WINDOWS = {"w5": 5, "w12": 12, "sqrt": "sqrt", "pair-9": (9, 0), "unbounded": None}
# causal=False: (3, 2); (2, 11) reaches past a whole shard to the right (multi-hop); an int and "sqrt"
# centred on the query; unbounded on both sides
TWO_SIDED = {"pair-3-2": (3, 2), "pair-2-11": (2, 11), "w5": 5, "sqrt": "sqrt", "unbounded": None}


def rel(a, b):
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else d


def data(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, L, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, L, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, L, HKV, D, generator=g, dtype=torch.float64)
    do = torch.randn(1, L, H, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def oracle(cu, window, q, k, v, do, causal=True):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = torch.zeros_like(q)
    for a, b in zip(cu, cu[1:]):  # each sequence alone
        o, _ = sliding_window_attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], window, causal)
        out = out.index_copy(1, torch.arange(a, b), o)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def parallel(cu, window, q, k, v, do, causal=True):
    ql, kl, vl = (t[:, LO:HI].clone().requires_grad_() for t in (q, k, v))
    out = context_parallel_packed_attention(ql, kl, vl, cu, window, causal)
    out.backward(do[:, LO:HI])
    return out.detach(), ql.grad, kl.grad, vl.grad


def errs(ref, got):
    return {name: rel(g, r[:, LO:HI]) for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got)}


results, controls, plans = {}, {}, {}
for i, (lname, cu) in enumerate(LAYOUTS.items()):
    for wname, window in WINDOWS.items():
        x = data(10 * i + len(wname))
        results[f"{lname}-{wname}"] = errs(oracle(cu, window, *x), parallel(cu, window, *x))
        p = packed_halo_plan(RANK, WORLD, cu, window)
        plans[f"{lname}-{wname}"] = {"halo": p.halo, "halo_right": p.halo_right, "sent": p.rows_sent(),
                                     "received": p.rows_received()}
    for wname, window in TWO_SIDED.items():
        x = data(50 + 10 * i + len(wname))
        results[f"{lname}-two-sided-{wname}"] = errs(oracle(cu, window, *x, causal=False),
                                                     parallel(cu, window, *x, causal=False))
        p = packed_halo_plan(RANK, WORLD, cu, window, causal=False)
        plans[f"{lname}-two-sided-{wname}"] = {"halo": p.halo, "halo_right": p.halo_right, "sent": p.rows_sent(),
                                               "received": p.rows_received()}
    # control: the window one key narrower than the oracle's (W = 5 against W = 4, 12 against 11)
    x = data(100 + i)
    for w in (5, 12):
        controls[f"{lname}-w{w}-vs-w{w - 1}"] = errs(oracle(cu, w, *x), parallel(cu, w - 1, *x))
    # and on the right: (3, 2) against (3, 1), two-sided
    controls[f"{lname}-two-sided-3-2-vs-3-1"] = errs(oracle(cu, (3, 2), *x, causal=False),
                                                     parallel(cu, (3, 1), *x, causal=False))

# bytes this rank sends in one forward + backward, counted on the calls (P2P sends, all-gathers)
sent = {}
real_batch, real_gather = dist.batch_isend_irecv, dist.all_gather


def counted_batch(ops):
    sent["p2p"] = sent.get("p2p", 0) + sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                                           if op.op is dist.isend)
    return real_batch(ops)


def counted_gather(parts, t, *args, **kwargs):
    sent["all_gather"] = sent.get("all_gather", 0) + t.numel() * t.element_size() * (WORLD - 1)
    return real_gather(parts, t, *args, **kwargs)


for name, cu, w in (("inside-and-one-boundary-w5", LAYOUTS["inside-and-one-boundary"], 5),
                    ("several-boundaries-w12", LAYOUTS["several-boundaries"], 12)):
    sent = {}
    dist.batch_isend_irecv, dist.all_gather = counted_batch, counted_gather
    parallel(cu, w, *data(3))
    dist.batch_isend_irecv, dist.all_gather = real_batch, real_gather
    plans[name]["bytes_counted"] = sum(sent.values())

# the public entry: context_parallel_attention(..., cu_seqlens=)
x = data(7)
cu = LAYOUTS["several-boundaries"]
ql, kl, vl = (t[:, LO:HI].clone().requires_grad_() for t in x[:3])
out = context_parallel_attention(ql, kl, vl, window_size="sqrt", cu_seqlens=torch.tensor(cu, dtype=torch.int32))
out.backward(x[3][:, LO:HI])
results["several-boundaries-sqrt-via-context_parallel_attention"] = errs(
    oracle(cu, "sqrt", *x), (out.detach(), ql.grad, kl.grad, vl.grad))

try:
    context_parallel_packed_attention(torch.zeros(1, N + (RANK == 1), H, D, dtype=torch.float64),
                                      *(torch.zeros(1, N + (RANK == 1), HKV, D, dtype=torch.float64),) * 2,
                                      LAYOUTS["aligned"], 5)
    mismatch = None
except ValueError as e:
    mismatch = str(e)

with open(os.path.join(sys.argv[1], f"rank{RANK}.json"), "w") as f:
    json.dump({"results": results, "controls": controls, "plans": plans, "mismatch": mismatch}, f, indent=1)
dist.barrier()
dist.destroy_process_group()
