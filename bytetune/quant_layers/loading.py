"""Fill a model built on the meta device from a float safetensors checkpoint, tensor by tensor.

Both multi-process trainers use this: FSDP2 (each rank holds a dim-0 shard of every tensor: a
DTensor) and the pipeline (each rank holds whole tensors of its own blocks only). A model whose
base is still on the meta device is allocated (only the tensors it has), then every tensor is read
from the checkpoint on its own: unquantized tensors as just this rank's rows of them, linear
weights of :class:`Int8Linear` layers quantized by the layer (:meth:`Int8Linear.load_float_weight`)
one at a time, so that no more than one float weight matrix is alive beyond the model's own
storage. Nothing of the checkpoint that the model does not hold is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bytetune.quant_layers.int8_embedding import Int8Embedding, Int8Head, quantize_rows_in_slabs
from bytetune.quant_layers.int8_linear import Int8Linear
from bytetune.quant_layers.shards import local_rows, local_tensor


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
        # the adapters' initial weights, kept aside while their layer was on the meta device
        # (bytetune.quant_layers.lora.LoraInt8Linear)
        for param_name, initial in module.__dict__.pop("initial_adapter_weights", {}).items():
            param = module.get_parameter(param_name)
            start, end = local_rows(param)
            local_tensor(param).copy_(initial[start:end])
            filled.add(id(param))
        if isinstance(module, Int8Linear):
            module.load_float_weight(checkpoint.rows(checkpoint_key(f"{name}.weight")), where=f"{name}.weight in {directory}")
            filled.update({id(module.weight), id(module.weight_scale)})
        elif isinstance(module, (Int8Embedding, Int8Head)) and id(module.weight) not in filled:
            # quantization.embeddings=int8: the float table as the one-process path quantizes it
            # (cast to the model's dtype first, then row-wise int8); a tied head shares the codes
            _load_int8_table(module, checkpoint.rows(checkpoint_key(f"{name}.weight")), f"{name}.weight in {directory}")
            filled.update({id(module.weight), id(module.row_scale if isinstance(module, Int8Head) else module.weight_scale)})
    for name, tensor in named_tensors(base):
        if id(tensor) in filled:
            continue
        start, end = local_rows(tensor)
        local_tensor(tensor).copy_(checkpoint.rows(checkpoint_key(name), start, end))
        filled.add(id(tensor))
    return checkpoint


@torch.no_grad()
def _load_int8_table(module: nn.Module, weight: torch.Tensor, where: str) -> None:
    """Quantize a float vocabulary table into an allocated Int8Embedding / untied Int8Head."""
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{where} has shape {tuple(weight.shape)}, the model expects {list(module.weight.shape)}")
    # the dtype the one-process model held the float table in before quantizing it
    dtype = module.output_dtype if isinstance(module, Int8Embedding) else getattr(module, "source_dtype", weight.dtype)
    scale = module.weight_scale if isinstance(module, Int8Embedding) else module.row_scale
    codes, scales = quantize_rows_in_slabs(weight.to(device=module.weight.device, dtype=dtype))
    module.weight.copy_(codes)
    scale.copy_(scales)


@torch.no_grad()
def load_table(module: nn.Module, checkpoint: SafetensorsCheckpoint, key: str) -> None:
    """Fill an allocated embedding table (nn.Embedding, or Int8Embedding: quantized as the
    one-process path does) from ``checkpoint``'s float tensor ``key``."""
    weight = checkpoint.rows(key)
    if isinstance(module, (Int8Embedding, Int8Head)):
        _load_int8_table(module, weight, f"{key} in {checkpoint.directory}")
    elif tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{key} in {checkpoint.directory} has shape {tuple(weight.shape)}, the model expects "
                         f"{list(module.weight.shape)}")
    else:
        module.weight.copy_(weight)
