"""The collectives of the context-parallel paths: a small all-gather of numbers (the consistency
checks every rank runs before an exchange sized by them) and batched point-to-point messages."""

from __future__ import annotations

from typing import List, Sequence

import torch


def _dist():
    import torch.distributed as dist

    return dist


def _collective_device(group) -> torch.device:
    """Where a small collective of ``group`` can run: the current GPU for NCCL, else CPU."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[float], group) -> List[List[float]]:
    """All-gather one short vector of numbers per rank (float64: exact for ints < 2^53)."""
    dist = _dist()
    world = dist.get_world_size(group)
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=_collective_device(group))
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


def _post(sends, recvs, group, like: torch.Tensor):
    """Post every send and receive of one exchange; returns (requests, receive buffers).

    ``sends``: (peer, tensor); ``recvs``: (peer, shape). Peers are group ranks.
    """
    dist = _dist()
    ops, bufs = [], []
    for peer, shape in recvs:
        buf = like.new_empty(shape)
        bufs.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
    for peer, t in sends:
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
    return (dist.batch_isend_irecv(ops) if ops else []), bufs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()
