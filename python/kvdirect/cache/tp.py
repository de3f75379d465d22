"""Tensor parallelism: ranks agree on how many pages they reuse (the smallest count)."""
from __future__ import annotations

from typing import Callable


def torch_dist_min(group=None) -> Callable[[int], int]:
    """TP agreement: all-reduce MIN over torch.distributed (gloo on CPU, NCCL/HCCL on devices)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend(group)
    device = "cpu" if backend == "gloo" else ("cuda" if torch.cuda.is_available() else "cpu")

    def reduce_min(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t.item())

    return reduce_min
