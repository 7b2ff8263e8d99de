"""The planner's input: a fine-tune reduced to its memory facts (:class:`PlanSpec`), built by hand
or from a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AutoConfig

from bytetune.recipe import bundled_model_config, shrink_model_config, torch_dtype


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=as_dtype(dtype)).element_size()


@dataclass
class PlanSpec:
    """What the planner needs to know about one fine-tune (a recipe reduced to its memory facts)."""

    model_config: "object"  # a transformers PretrainedConfig
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool = True
    compute_dtype: str | torch.dtype = torch.bfloat16
    # "int8": block linears are Int8Linear; "zeroquant": GroupQuantLinear (bits per module from
    # zeroquant_bits, groups of group_size); "none": frozen compute-dtype linears
    quantization: str = "int8"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # Leaf names of the block linears that get LoRA (and int8), or "all-linear" for every one.
    lora_targets: str | Sequence[str] = "all-linear"
    # MoE: names of the fused 3-D expert parameters that get LoRA (PEFT's target_parameters).
    lora_target_parameters: Sequence[str] = ()
    lora_dtype: str | torch.dtype = torch.float32
    optimizer: str = "adamw8bit"  # the recipe's optimizer.name (for display)
    optimizer_states: int = 2  # moments per parameter: 2 for Adam(W), 1 for Lion / momentum SGD
    optimizer_bits: int = 8  # 8: block-wise quantized states; 32: fp32 states
    min_8bit_size: int = 4096  # smaller tensors keep fp32 states
    optimizer_block: int = 256  # elements per float32 absmax
    # Block linears kept unquantized (suffixes, like quantization.skip_modules).
    quantization_skip: Sequence[str] = ()
    zeroquant_bits: dict | None = None  # {regex on the module name: 8 or 4}; None: bytetune's default
    group_size: int = 128
    # "int8": word embeddings and the output head frozen row-wise in int8 (Int8Embedding /
    # Int8Head: int8 [vocab, hidden] + a float32 scale per row, one table when tied); "none":
    # the compute dtype.
    embeddings: str = "none"
    # The trainer's fused linear + cross-entropy (token chunks, no [tokens, vocab] fp32 logits);
    # False: the loss from the model's full logits.
    fused_cross_entropy: bool = False
    # "none": one process, the model split over the devices by a device map; "fsdp": FSDP2, one
    # process per device, each holding 1/N of the weights, LoRA and optimizer states and running
    # the whole model on its own micro-batch.
    parallel: str = "none"
    # FSDP2 frees a block's gathered weights after its forward (True) or keeps them to its backward.
    reshard_after_forward: bool = True
    # Micro-batches per optimizer step (each ``micro_batch`` sequences): the pipeline's schedule
    # runs them through the stages together; otherwise the gradient-accumulation steps.
    micro_batches: int = 1
    # parallel="pipeline": the torch.distributed.pipelining schedule, "1f1b" (stage k of p keeps at
    # most p-k micro-batches in flight) or "gpipe" (all m forwards before the backwards).
    pipeline_schedule: str = "1f1b"
    # parallel="pipeline", "interleaved_1f1b": V, the stages each GPU runs (p GPUs, p*V stages;
    # GPU r the stages r, r+p, ...); 1 under "1f1b" and "gpipe".
    pipeline_stages_per_rank: int = 1
    # parallel="pipeline": the first stage keeps the (frozen) input embedding table in host memory
    # and looks the tokens up there; the GPUs hold none of it but a tied head's copy on the last.
    pipeline_cpu_embeddings: bool = False
    name: str = "model"

    def __post_init__(self):
        if self.quantization not in ("int8", "zeroquant", "none"):
            raise ValueError(f"quantization={self.quantization!r}: use 'int8', 'zeroquant' or 'none'")
        if self.embeddings not in ("int8", "none"):
            raise ValueError(f"embeddings={self.embeddings!r}: use 'int8' or 'none'")
        if self.parallel not in ("none", "fsdp", "pipeline"):
            raise ValueError(f"parallel={self.parallel!r}: use 'none', 'fsdp' or 'pipeline'")
        if self.pipeline_schedule not in ("1f1b", "gpipe", "interleaved_1f1b"):
            raise ValueError(f"pipeline schedule {self.pipeline_schedule!r}: use '1f1b', 'gpipe' or 'interleaved_1f1b'")
        interleaved = self.pipeline_schedule == "interleaved_1f1b"
        if (self.pipeline_stages_per_rank >= 2) != interleaved or self.pipeline_stages_per_rank < 1:
            raise ValueError(f"pipeline_stages_per_rank={self.pipeline_stages_per_rank} with schedule "
                             f"{self.pipeline_schedule!r}: interleaved_1f1b takes 2 or more, 1f1b and gpipe 1")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches}: must be >= 1")
        if self.optimizer_bits not in (8, 32):
            raise ValueError(f"optimizer_bits={self.optimizer_bits}: use 8 or 32")
        if self.seq_len < 1 or self.micro_batch < 1:
            raise ValueError(f"seq_len={self.seq_len}, micro_batch={self.micro_batch}: both must be >= 1")


def model_config_from_recipe(recipe):
    """The transformers config of a recipe's model: its bundled config.json, shrunk as the recipe says."""
    if not recipe.model.config_file:
        raise ValueError(
            f"recipe {recipe.name!r} names no model.config_file: the planner builds the model from a "
            "bundled config (bytetune/recipe/model_configs/NAME.json)"
        )
    config_dict = shrink_model_config(bundled_model_config(recipe.model.config_file), recipe.model.shrink)
    model_type = config_dict.pop("model_type")
    config_dict.pop("architectures", None)
    return AutoConfig.for_model(model_type, **config_dict)


def spec_from_recipe(recipe, model_config=None) -> PlanSpec:
    """A recipe (bytetune.recipe.RecipeConfig, loaded) reduced to its memory facts.

    ``model_config`` (a transformers config) replaces the recipe's bundled one, for a model built
    by hand.
    """
    targets = list(recipe.lora.target_modules)
    name = recipe.optimizer.name
    # The recipe's parallel section (FSDP2) exists once the trainer has one; older recipes lack it.
    parallel = recipe.get("parallel")
    pipeline = parallel.get("pipeline") if parallel is not None else None
    accumulation = recipe.training.grad_accum_steps
    return PlanSpec(
        model_config=model_config if model_config is not None else model_config_from_recipe(recipe),
        seq_len=recipe.training.seq_len,
        micro_batch=recipe.training.micro_batch_size,
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        compute_dtype=recipe.model.dtype,
        quantization="int8" if recipe.quantization.int8 else ("zeroquant" if recipe.quantization.zeroquant else "none"),
        quantization_skip=tuple(recipe.quantization.skip_modules),
        zeroquant_bits=dict(recipe.quantization.module_bits) or None,
        group_size=recipe.quantization.group_size,
        lora_r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        lora_targets="all-linear" if targets == ["all-linear"] else targets,
        lora_target_parameters=tuple(recipe.lora.get("target_parameters") or ()),
        lora_dtype=torch.float32,  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
        optimizer=name,
        optimizer_states=1 if name in ("lion8bit", "sgd8bit") else 2,
        optimizer_bits=32 if name == "adamw" else recipe.optimizer.optim_bits,
        min_8bit_size=recipe.optimizer.min_8bit_size,
        optimizer_block=recipe.optimizer.block_size,
        embeddings=recipe.quantization.get("embeddings") or "none",
        fused_cross_entropy=bool(recipe.training.get("fused_cross_entropy", False)),
        parallel=parallel.get("strategy", "none") if parallel is not None else "none",
        reshard_after_forward=bool(parallel.get("reshard_after_forward", True)) if parallel is not None else True,
        micro_batches=(pipeline.get("micro_batches") if pipeline is not None else None) or accumulation,
        pipeline_schedule=pipeline.get("schedule", "1f1b") if pipeline is not None else "1f1b",
        pipeline_cpu_embeddings=bool(pipeline.get("cpu_embeddings", False)) if pipeline is not None else False,
        # the recipe check (bytetune.recipe.pipeline_stages_per_rank) has the same default
        pipeline_stages_per_rank=(pipeline.get("stages_per_rank") or
                                  (2 if pipeline.get("schedule") == "interleaved_1f1b" else 1)) if pipeline is not None else 1,
        name=recipe.name,
    )
