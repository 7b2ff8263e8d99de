"""Fill a model built on the meta device from a float safetensors checkpoint, tensor by tensor.

Both multi-process trainers use this: FSDP2 (each rank holds a dim-0 shard of every tensor: a
DTensor) and the pipeline (each rank holds whole tensors of its own blocks only). A model whose
base is still on the meta device is allocated (only the tensors it has), then every tensor is read
from the checkpoint on its own: unquantized tensors as just this rank's rows of them, the float
weights of the frozen quantized layers (Int8Linear, GroupQuantLinear, Int8Embedding / Int8Head,
Int8Experts) by the layer itself (``layer.load_from_checkpoint``: the layer owns its storage
format), one at a time, so that no more than one float weight matrix is alive beyond the model's
own storage. Nothing of the checkpoint that the model does not hold is read.

Who builds such a model says where its weights are with a :class:`DeferredBase` (the model
builder takes it, the FSDP and pipeline loaders call its :meth:`DeferredBase.load`); the LoRA
adapters drawn on the meta base keep their initial weights themselves
(:meth:`LoraInt8Linear.restore_initial_adapters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bytetune.quant_layers.frozen_linear import FrozenQuantLinear
from bytetune.quant_layers.int8_embedding import Int8Embedding, Int8Head
from bytetune.quant_layers.int8_experts import Int8Experts
from bytetune.quant_layers.lora import LoraInt8Linear
from bytetune.quant_layers.shards import local_rows, local_tensor

# The layers that fill themselves from a float checkpoint (``load_from_checkpoint``).
SELF_LOADING_LAYERS = (FrozenQuantLinear, Int8Embedding, Int8Experts)


def named_tensors(model: nn.Module):
    """Parameters, then buffers (each tensor once, under the first name it has)."""
    yield from model.named_parameters()
    yield from model.named_buffers()


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory (one model.safetensors or an index over shards),
    read one at a time, or only some of their rows. ``bytes_read`` counts what was read."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._open = safe_open
        self.directory = Path(directory)
        self.bytes_read = 0
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {key: self.directory / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for path in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(path), "pt") as handle:
                    self.files.update({key: path for key in handle.keys()})

    def key_for(self, name: str, prefix: str) -> str | None:
        """The checkpoint key of a model tensor name (checkpoints of the bare model lack the prefix)."""
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in self.files:
                return key
        return None

    def rows(self, key: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        with self._open(str(self.files[key]), "pt") as handle:
            tensor = handle.get_tensor(key) if start is None else handle.get_slice(key)[start:end]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Name -> the first name of the same tensor, for tensors a module shares with another
    (tied embeddings and head); transformers saves such a tensor once, under its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Point every alias back at its canonical tensor (to_empty allocates each module's anew)."""
    present = dict(model.named_parameters(remove_duplicate=False))
    present.update(model.named_buffers(remove_duplicate=False))
    for name, canonical in tied.items():
        if name in present and canonical in present and present[name] is not present[canonical]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, present[canonical])


@dataclass(frozen=True)
class DeferredBase:
    """A base model built on the meta device (architecture only) whose weights are read later from
    the float safetensors checkpoint in ``directory``, by whoever holds a part of the model: each
    FSDP rank its shards, each pipeline stage its blocks. The model builder takes it
    (``build_model(cfg, deferred=...)``) and the loader that fills the model calls :meth:`load`."""

    directory: Path

    def load(self, model: nn.Module, device: torch.device,
             aliases: dict[str, str] | None = None) -> "SafetensorsCheckpoint":
        """Allocate ``model`` (what it holds of the base) on ``device`` and fill it (see
        :func:`load_float_checkpoint`); returns the reader (``bytes_read``)."""
        return load_float_checkpoint(model, self.directory, device, aliases)


@torch.no_grad()
def load_float_checkpoint(model: nn.Module, directory: Path, device: torch.device,
                          aliases: dict[str, str] | None = None) -> SafetensorsCheckpoint:
    """Allocate a model whose base is on the meta device and fill it from ``directory``.

    ``model`` is a PEFT model (or a bare transformers model). Tensors already real (the adapters'
    initial weights, buffers such as rotary frequencies) are kept. ``aliases`` maps a tensor name
    of ``model`` to the name it had in the whole model, for tensors that were tied to one the
    model no longer holds (a pipeline's last stage keeps the head tied to embeddings it dropped).
    Returns the checkpoint reader (its ``bytes_read`` says how much was read)."""
    # to_empty allocates every tensor anew: keep what is real already, and which tensors are shared.
    kept = {name: local_tensor(tensor).clone() for name, tensor in named_tensors(model) if tensor.device.type != "meta"}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = tied_aliases(base)
    model.to_empty(device=device)
    _retie(base, tied)
    for name, tensor in named_tensors(model):
        if name in kept:
            local_tensor(tensor).copy_(kept[name])
    checkpoint = SafetensorsCheckpoint(directory)
    prefix = base.base_model_prefix
    aliases = {**tied, **(aliases or {})}
    filled = {id(tensor) for name, tensor in named_tensors(model) if name in kept}

    def checkpoint_key(name: str) -> str:
        name = aliases.get(name, name)
        key = checkpoint.key_for(name.replace(".base_layer", ""), prefix)  # PEFT's wrapper
        if key is None:
            raise FileNotFoundError(f"{directory} has no tensor for {name}: is it this model's checkpoint?")
        return key

    for name, module in base.named_modules():
        if isinstance(module, LoraInt8Linear):
            # the adapters' initial weights, which the layer kept while its base was on the meta device
            filled.update(id(param) for param in module.restore_initial_adapters())
        if isinstance(module, SELF_LOADING_LAYERS) and not any(id(t) in filled for t in module.parameters(recurse=False)):
            # the layer quantizes its float weights as the one-process path does (a tied head's
            # table is its embedding's, already filled or filled when the embedding comes)
            def read(tensor_name: str, prefix: str = name) -> torch.Tensor:
                return checkpoint.rows(checkpoint_key(f"{prefix}.{tensor_name}"))

            filled.update(id(t) for t in module.load_from_checkpoint(read, where=f"{name}.{{}} in {directory}"))
    for name, tensor in named_tensors(base):
        if id(tensor) in filled:
            continue
        start, end = local_rows(tensor)
        local_tensor(tensor).copy_(checkpoint.rows(checkpoint_key(name), start, end))
        filled.add(id(tensor))
    return checkpoint


@torch.no_grad()
def load_table(module: nn.Module, checkpoint: SafetensorsCheckpoint, key: str) -> None:
    """Fill an allocated embedding table (nn.Embedding, or Int8Embedding: quantized by the layer
    as the one-process path does) from ``checkpoint``'s float tensor ``key``."""
    weight = checkpoint.rows(key)
    if isinstance(module, (Int8Embedding, Int8Head)):
        module.load_float_weight(weight, f"{key} in {checkpoint.directory}")
    elif tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{key} in {checkpoint.directory} has shape {tuple(weight.shape)}, the model expects "
                         f"{list(module.weight.shape)}")
    else:
        module.weight.copy_(weight)
