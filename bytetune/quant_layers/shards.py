"""What part of a tensor this process holds: all of it, or its FSDP2 shard (a DTensor on dim 0)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """Rows [start, end) of dim 0 this rank holds (FSDP2 splits dim 0 as torch.chunk does)."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0]
    per_rank = -(-tensor.shape[0] // tensor.device_mesh.size())
    start = min(tensor.shape[0], tensor.device_mesh.get_local_rank() * per_rank)
    return start, min(tensor.shape[0], start + per_rank)
