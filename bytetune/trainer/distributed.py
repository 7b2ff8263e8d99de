"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for LoRA on a frozen int8 base.

Each decoder block is one FSDP group, the model itself the root group (embeddings, final norm,
head), sharded last. A group's parameters are stored as DTensors sharded on dim 0 over all ranks:
Int8Linear's int8 codes and frozen bias, the norms, and the LoRA matrices. The forward and the
backward all-gather one block at a time; LoRA gradients are reduce-scattered, so the optimizer
(bytetune.optim, state per local shard) updates each rank's shard only.

Int8Linear's per-row scales are float32 *buffers*: FSDP2 does not shard buffers, so every rank
keeps all of them (4 bytes per output row, 1/in_features of the codes: 0.03 % for BLOOM-176B),
and no MixedPrecisionPolicy can cast them to bf16. No MixedPrecisionPolicy is set: the recipe's
precision is autocast, as in the single-process trainer, so an FSDP run computes what a single
process computes.

The trainer shards the model itself rather than through accelerate's FSDP2 plugin: accelerate
builds that plugin only for GPU process groups (a CPU run stays MULTI_CPU, so the CPU tests could
not exercise it), wants the model and optimizer prepared in one call and swaps the optimizer's
parameters afterwards, casts fp32 parameters under its mixed-precision policy, and its
cpu_ram_efficient_loading broadcasts a full state dict from rank 0. accelerate still launches the
processes and owns the process group; ``accelerate launch --config_file
bytetune/recipe/accelerate/fsdp2.yaml`` (ACCELERATE_USE_FSDP=true) or the recipe's
``parallel.strategy: fsdp`` selects this path, and the config's ``fsdp_reshard_after_forward``
is honoured.

Checkpoints go through ``torch.distributed.checkpoint``: every rank writes its shards of the
adapters and of the optimizer states (DTensors, see bytetune.optim), bit-exact; a PEFT-format copy
of the full adapters is written beside them by rank 0 (plain ``PeftModel.from_pretrained`` loads
it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from bytetune.quant_layers.blocks import NoDecoderBlocks
from bytetune.quant_layers.blocks import decoder_blocks as find_decoder_blocks
from bytetune.quant_layers.loading import DeferredBase
from bytetune.quant_layers.shards import local_tensor as _local
from bytetune.recipe import RecipeError
from bytetune.trainer import checkpoint as ckpt
from bytetune.loaders.models import resolve_model_dir

STRATEGY_FSDP = "fsdp"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files inside a checkpoint directory
# Set by `accelerate launch` from an accelerate config with distributed_type FSDP.
ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"
ACCELERATE_RESHARD_ENV = "FSDP_RESHARD_AFTER_FORWARD"


def fsdp_requested(cfg) -> bool:
    """The recipe asks for FSDP (``parallel.strategy: fsdp``) or accelerate was launched with an
    FSDP config."""
    return cfg.parallel.strategy == STRATEGY_FSDP or os.environ.get(ACCELERATE_FSDP_ENV, "false").lower() == "true"


def use_fsdp(cfg) -> bool:
    """FSDP is asked for and there are several processes to shard over (torchrun and accelerate
    launch set WORLD_SIZE before the trainer starts)."""
    return fsdp_requested(cfg) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_fsdp_recipe(cfg) -> None:
    """What an FSDP run cannot do, named before the model loads."""
    if cfg.model.device_map is not None:
        raise RecipeError(
            f"model.device_map={cfg.model.device_map!r} splits one model over the GPUs of one process; FSDP shards it "
            "over processes instead: set model.device_map=null with parallel.strategy=fsdp"
        )
    if cfg.training.precision == "fp16":
        raise RecipeError("training.precision=fp16 needs a gradient scaler, which the FSDP path does not run: use bf16")
    if cfg.quantization.zeroquant:
        raise RecipeError("quantization.zeroquant is not supported under FSDP yet (untested): use quantization.int8")
    if cfg.optimizer.name == "adamw":
        raise RecipeError(
            "optimizer.name=adamw (torch's AdamW) has no sharded-checkpoint support here: use adamw8bit "
            "(optimizer.optim_bits=32 for 32-bit states)"
        )
    if cfg.export.merged:
        raise RecipeError(
            "export.merged is not available under FSDP (no rank holds the whole base): train with FSDP, then merge "
            "the saved adapter in one process (bytetune.quant_layers.lora.export_merged)"
        )


def _reshard_after_forward(cfg) -> bool:
    from_accelerate = os.environ.get(ACCELERATE_RESHARD_ENV)
    if from_accelerate is not None:
        # FSDP2 configs say true/false; FSDP1-style configs name a sharding strategy.
        return from_accelerate.lower() not in ("false", "shard_grad_op", "no_shard")
    return cfg.parallel.reshard_after_forward


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (bytetune.quant_layers.blocks: the planner's, LKD's and the pipeline's)."""
    try:
        return [block for _, block in find_decoder_blocks(model)]
    except NoDecoderBlocks as error:
        raise RecipeError(f"{error}; FSDP needs one fully_shard group per block") from None


def sharded_base(cfg) -> DeferredBase | None:
    """Where each rank reads its shard of the base from, when the recipe's base is a local
    directory of safetensors files; None for from_config, GGUF and hub-id bases (loaded whole,
    then sharded)."""
    if cfg.model.from_config or cfg.model.gguf_file:
        return None
    try:
        directory = Path(resolve_model_dir(cfg.model.name_or_path))
    except FileNotFoundError:
        return None
    return DeferredBase(directory) if directory.is_dir() and any(directory.glob("*.safetensors")) else None


def shard_model(model: nn.Module, device: torch.device, cfg, deferred: DeferredBase | None = None) -> nn.Module:
    """``fully_shard`` every decoder block, then the root; returns the (same, now sharded) model.

    A base built empty (``build_model(cfg, deferred=deferred)``: parameters on the meta device) is
    sharded as it is, then each rank reads and quantizes its rows of the weights from
    ``deferred``'s checkpoint."""
    if not dist.is_initialized():
        raise RecipeError(
            "parallel.strategy=fsdp needs a process group: start with `accelerate launch --config_file "
            "bytetune/recipe/accelerate/fsdp2.yaml train.py ...` (or torchrun)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = _reshard_after_forward(cfg)
    if deferred is None:
        model.to(device)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if deferred is not None:
        # each rank allocates only its shards, reads only its rows of unquantized tensors, and
        # each quantized layer quantizes its own weight, one at a time (a row's codes depend on
        # that row alone; every row's scales are kept, as FSDP2 does not shard buffers); the
        # loader is bytetune.quant_layers.loading's, shared with the pipeline stages
        deferred.load(model, device)
    return model


class no_gradient_sync:
    """Accumulate unsharded gradients without reduce-scattering them (all but the last micro-batch)."""

    def __init__(self, model: FSDPModule):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clipping over the sharded gradients (the norm is reduced over ranks by DTensor)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the full tensor of every trainable parameter, on CPU; every rank must call this
    (each parameter is all-gathered), and only these small tensors are gathered."""
    return {
        name: _full(param.detach()).cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def local_frozen_int8_bytes(model: nn.Module) -> int:
    """Bytes of int8 parameters this rank stores (its shards of the frozen codes)."""
    total = 0
    for param in model.parameters():
        if _local(param).dtype == torch.int8:
            total += _local(param).numel()
    return total


def save_adapter(model, directory: Path, is_main: bool, tokenizer=None) -> None:
    """The full adapters in PEFT format, written by the main process (all ranks call this)."""
    state = trainable_state(model)
    if is_main:
        model.save_pretrained(str(directory), state_dict=state, save_embedding_layers=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _optimizer_by_name(model: nn.Module, optimizer) -> dict:
    """The optimizer's state dict keyed by parameter name instead of position (checkpoint-stable)."""
    state_dict = optimizer.state_dict()
    names = _position_names(model, optimizer)
    return {
        "state": {names[pid]: state for pid, state in state_dict["state"].items()},
        "param_groups": state_dict["param_groups"],
    }


def _position_names(model: nn.Module, optimizer) -> list[str]:
    name_of = {id(param): name for name, param in model.named_parameters()}
    return [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]


def write_checkpoint(temporary: Path, model: nn.Module, optimizer, scheduler, state: dict, is_main: bool) -> None:
    """All ranks: the checkpoint.write_main of an FSDP run. The PEFT-format adapters (main process),
    every rank's shards of the adapters and optimizer states, then the scheduler and the state file
    that marks the checkpoint complete."""
    save_adapter(model, temporary, is_main)
    sharded = {"adapter": {name: param.detach() for name, param in _named_trainable(model).items()},
               "optimizer": _optimizer_by_name(model, optimizer)}
    dcp.save(sharded, checkpoint_id=str(temporary / SHARDED_DIR))
    if is_main:
        torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
        (temporary / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1))


def read_sharded(directory: Path, model: nn.Module, optimizer) -> None:
    """Load this rank's shards of the adapters and optimizer states, bit for bit (collective)."""
    if not (directory / SHARDED_DIR).is_dir():
        raise ckpt.CheckpointError(
            f"checkpoint {directory} has no {SHARDED_DIR}/ folder: it was not written by an FSDP run; resume it "
            "without FSDP, as it was written"
        )
    optimizer.init_states()  # the loader fills a state dict of the right shapes
    params = _named_trainable(model)
    template = {"adapter": {name: torch.empty_like(param.detach()) for name, param in params.items()},
                "optimizer": _optimizer_by_name(model, optimizer)}
    dcp.load(template, checkpoint_id=str(directory / SHARDED_DIR))
    with torch.no_grad():
        for name, param in params.items():
            _local(param).copy_(_local(template["adapter"][name]))
    names = _position_names(model, optimizer)
    by_name = template["optimizer"]
    optimizer.load_state_dict({
        "state": {names.index(name): state for name, state in by_name["state"].items()},
        "param_groups": by_name["param_groups"],
    })

