"""Letting go of a checkpoint's file mapping once its linear layers are quantized.

transformers loads safetensors without copying: every tensor is a view into one private mapping of
the checkpoint file. Quantizing the linears reads all their pages (they become resident), and the
float tensors that stay (embeddings, norms, biases) keep the whole mapping alive, so the process
keeps the full float checkpoint resident next to its int8 copy: SmolLM2-135M held 400 MB of file
pages for a 113 MB embedding and a few norms. Copying those few tensors into ordinary memory lets
the mapping go.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) addresses of this process's file-backed mappings; [] where
    /proc/self/maps does not exist (not Linux: nothing is done there)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # the sixth field is the mapped path; anonymous memory has none or "[heap]"-like names
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return sorted(ranges)


@torch.no_grad()
def copy_out_of_file_mappings(model: nn.Module) -> int:
    """Copy the CPU parameters and buffers of ``model`` that live in a file mapping into ordinary
    memory, one tensor at a time, in place (tied parameters stay tied: they are one Parameter).
    Returns how many tensors were copied."""
    ranges = _file_mappings()
    if not ranges:
        return 0
    starts = [start for start, _ in ranges]
    copied = 0
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
                    continue
                address = tensor.untyped_storage().data_ptr()
                index = bisect.bisect_right(starts, address) - 1
                if index >= 0 and address < ranges[index][1]:
                    tensor.data = tensor.data.clone()
                    copied += 1
    return copied
