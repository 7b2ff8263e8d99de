"""Pipeline-parallel LoRA training over a frozen int8 base (``parallel.strategy: pipeline``).

One process per GPU (or CPU rank over gloo), started by ``torchrun`` or ``accelerate launch``.
Process k is pipeline stage k: it holds a contiguous range of decoder blocks, the embeddings too
when it is the first stage, the final norm, the head and the loss when it is the last. Each stage
is built on the meta device from the checkpoint's config, pruned to its own modules, then filled
from the local safetensors checkpoint tensor by tensor (bytetune.quant_layers.loading, the loader
FSDP uses): no process reads, let alone holds, another stage's weights. Only activations (and
their gradients) cross between processes, through torch.distributed.pipelining's
``PipelineStage`` and a ``Schedule1F1B`` / ``ScheduleGPipe``. Under ``interleaved_1f1b``
(``ScheduleInterleaved1F1B``) each of the p processes runs V = parallel.pipeline.stages_per_rank
stages of the p*V: rank r stages r, r+p, r+2p, ..., each a model built and loaded as above with
only that stage's blocks, so the first stage is on rank 0 and the last (head, loss) on rank p-1.

What makes a pipeline step equal the single-process step (to float rounding):

- the same rows: the micro-batches of step s are the single-process trainer's micro-batches of
  that step (one data-parallel replica: every stage reads the same rows);
- the same LoRA initial weights: every stage builds the adapters of the whole (meta) model under
  the run's seed before pruning, so a block's adapters are the ones one process draws;
- the same loss: each micro-batch's summed cross-entropy is divided by the step's total target
  tokens (the token-weighted loss of trainer.py's ``_train_step``), schedules run with
  ``scale_grads=False`` so nothing else rescales the gradients;
- the same clipping: the global gradient norm is the square root of the all-reduced sum of every
  stage's squared norms;
- the same non-finite guard: the loss sum is all-reduced, so every stage skips the same steps.

Evaluation runs forward only through the stages (point-to-point sends of the hidden states).
A checkpoint holds, per stage, that stage's adapters and optimizer states (``stage<k>.pt``, and
``rng_rank<k>.pt``), written into the shared temporary directory and renamed into place by rank 0
after every stage wrote (trainer/checkpoint.py's protocol), plus one ordinary PEFT adapter of the
whole model gathered to rank 0. The final adapter is the same single PEFT adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bytetune.quant_layers.blocks import NoDecoderBlocks, decoder_block_list
from bytetune.quant_layers.int8_embedding import Int8Head
from bytetune.quant_layers.loading import DeferredBase, SafetensorsCheckpoint, load_table, tied_aliases
from bytetune.recipe import PYPI_PREFIX, RecipeError, check_pipeline_layout, is_local_path, pipeline_stages_per_rank
from bytetune.trainer import checkpoint as ckpt
from bytetune.loaders.data import DataError, build_token_blocks
from bytetune.trainer.loss import _head_loss, _summed_ce_of_logits, target_token_count
from bytetune.loaders.models import resolve_model_dir
from bytetune.trainer.trainer import (
    PRECISION_TO_ACCELERATE,
    Trainer,
    TrainingError,
    RunStart,
    _accelerator,
    _start_of_run,
    build_model,
    build_optimizer,
    build_scheduler,
    preflight,
)

STRATEGY_PIPELINE = "pipeline"
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
STAGE_FILE = "stage{}.pt"  # rank k's adapters and optimizer states (all its stages), inside a checkpoint

# Per model type: (modules of the backbone only the first stage runs and later stages drop,
# modules the first stage runs right after the embeddings and later stages replace by identity,
# final modules only the last stage runs). The blocks are found as _no_split_modules.
ARCHITECTURES = {
    "bloom": (("word_embeddings",), ("word_embeddings_layernorm",), ("ln_f",)),
    "llama": (("embed_tokens",), (), ("norm",)),
    "mistral": (("embed_tokens",), (), ("norm",)),
    "qwen2": (("embed_tokens",), (), ("norm",)),
    "qwen3": (("embed_tokens",), (), ("norm",)),
}


# --------------------------------------------------------------------------------- recipe checks
def pipeline_requested(cfg) -> bool:
    return cfg.parallel.strategy == STRATEGY_PIPELINE


def use_pipeline(cfg) -> bool:
    """Pipeline asked for and several processes to put stages on (torchrun sets WORLD_SIZE)."""
    return pipeline_requested(cfg) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def micro_batches(cfg) -> int:
    """Micro-batches per optimizer step: parallel.pipeline.micro_batches, else the accumulation steps."""
    return cfg.parallel.pipeline.micro_batches or cfg.training.grad_accum_steps


# What a stage needs of a hub repository: the weights, the configs, the tokenizer's files.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def hub_model_id(cfg) -> str | None:
    """model.name_or_path when it names a hub repository (not a local path, not pypi:)."""
    name = cfg.model.name_or_path
    if cfg.model.from_config or cfg.model.gguf_file or name.startswith(PYPI_PREFIX) or is_local_path(name):
        return None
    return None if Path(name).exists() else name


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model's safetensors, configs and tokenizer files, downloaded
    once into the Hugging Face cache (every later call, and every other stage, finds it there)."""
    import huggingface_hub

    try:
        directory = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # network, authentication, a repository that does not exist
        raise RecipeError(f"model.name_or_path={repo_id!r}: could not download its safetensors files "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): check the name "
                          "and the network, or download it (huggingface-cli download NAME --local-dir DIR) and set "
                          "model.name_or_path=DIR") from None
    if not any(directory.glob("*.safetensors")):
        raise RecipeError(f"model.name_or_path={repo_id!r} has no safetensors files on the hub: a pipeline stage reads "
                          "its own tensors from them; convert the model (save_pretrained) and set model.name_or_path=DIR")
    return directory


def with_local_model(cfg, directory: Path):
    """A copy of the recipe naming ``directory`` as the model (the run's own recipe, and so its
    identity and fingerprint, keep the hub id)."""
    import copy

    local = copy.deepcopy(cfg)
    local.model.name_or_path = str(directory)
    return local


def can_load_stage_only(cfg) -> bool:
    """A local directory of safetensors files, or a hub repository (downloaded to one): each
    stage reads its own tensors of it."""
    if cfg.model.from_config or cfg.model.gguf_file:
        return False
    if hub_model_id(cfg) is not None:
        return True  # hub_snapshot says so in one line when it has no safetensors files
    try:
        directory = Path(resolve_model_dir(cfg.model.name_or_path))
    except FileNotFoundError:
        return False
    return directory.is_dir() and any(directory.glob("*.safetensors"))


def check_pipeline_recipe(cfg, stages: int) -> None:
    """What a pipeline run over ``stages`` processes cannot do, named before the model loads."""
    schedule = cfg.parallel.pipeline.schedule
    if schedule not in SCHEDULES:
        raise RecipeError(f"parallel.pipeline.schedule={schedule} is not supported: use one of {', '.join(SCHEDULES)}")
    if cfg.model.device_map is not None:
        raise RecipeError(f"model.device_map={cfg.model.device_map!r} splits one model inside one process; the pipeline "
                          "puts each stage in its own process: set model.device_map=null with parallel.strategy=pipeline")
    if not (cfg.model.from_config or can_load_stage_only(cfg)):
        raise RecipeError(
            f"model.name_or_path={cfg.model.name_or_path!r}: a pipeline stage reads only its own tensors from a local "
            "directory of safetensors files; download the model (huggingface-cli download NAME --local-dir DIR, "
            "or save a GGUF-converted model with save_pretrained) and set model.name_or_path=DIR"
        )
    if cfg.training.precision == "fp16":
        raise RecipeError("training.precision=fp16 needs a gradient scaler, which the pipeline path does not run: use bf16")
    if cfg.quantization.zeroquant:
        raise RecipeError("quantization.zeroquant is not supported by the pipeline yet (untested): use quantization.int8")
    if cfg.export.merged:
        raise RecipeError("export.merged is not available under the pipeline (no process holds the whole base): train, "
                          "then merge the saved adapter in one process (bytetune.quant_layers.lora.export_merged)")
    if cfg.lora.dropout:
        # Every stage draws its own masks: a run is reproducible, but not the one-process run.
        warnings.warn("lora.dropout > 0 under the pipeline: each stage draws its own dropout masks")
    # micro-batches for the processes and the schedule; stages vs blocks again once the model is built
    check_pipeline_layout(cfg, stages, _configured_blocks(cfg))


def _configured_blocks(cfg) -> int | None:
    """The decoder blocks of the recipe's model, from its config file alone (None when that is
    not cheap to know before loading: check_pipeline_layout checks them again in build_stage)."""
    from bytetune.recipe import bundled_model_config, shrink_model_config

    try:
        if cfg.model.from_config:
            config = shrink_model_config(bundled_model_config(cfg.model.config_file), cfg.model.shrink)
        elif cfg.model.gguf_file or hub_model_id(cfg) is not None:
            return None
        else:
            config = json.loads((Path(resolve_model_dir(cfg.model.name_or_path)) / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError, KeyError, TypeError):
        return None
    blocks = config.get("num_hidden_layers", config.get("n_layer"))
    return blocks if isinstance(blocks, int) else None


# ------------------------------------------------------------------------------------ the split
def split_blocks(num_blocks: int, stages: int) -> list[range]:
    """Contiguous block ranges, one per stage, as even as the count allows; the first and last
    stages (which also hold the embeddings and the head with the loss) get the shorter ranges.
    The planner's placement can be passed to :func:`build_stage` instead."""
    if not 1 <= stages <= num_blocks:
        raise RecipeError(f"{stages} pipeline stages for {num_blocks} decoder blocks: use between 1 and {num_blocks} "
                          "processes")
    sizes = [num_blocks // stages] * stages
    middle_first = sorted(range(stages), key=lambda k: (k in (0, stages - 1), abs(k - (stages - 1) / 2)))
    for k in middle_first[: num_blocks % stages]:
        sizes[k] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def default_ranges(cfg, model_config, num_blocks: int, stages: int) -> list[range]:
    """The planner's stage ranges (bytetune.plan.pipeline_stages: balanced for memory and FLOPs,
    the embeddings on stage 0, the head on the last) for the model this run builds (its bundled
    or local config); :func:`split_blocks` when the planner cannot model it."""
    from bytetune.plan import pipeline_stages, spec_from_recipe

    if not 1 <= stages <= num_blocks:
        return split_blocks(num_blocks, stages)  # which says what is wrong
    try:
        ranges = pipeline_stages(spec_from_recipe(cfg, model_config=model_config), stages)
    except (ValueError, KeyError, TypeError, NotImplementedError) as error:
        warnings.warn(f"the planner cannot split this model ({str(error).splitlines()[0] if str(error) else error!r}): "
                      "even block ranges instead")
        return split_blocks(num_blocks, stages)
    ranges = [range(r.start, r.stop) for r in ranges]
    if [i for r in ranges for i in r] != list(range(num_blocks)):
        return split_blocks(num_blocks, stages)  # the planner modelled another block count
    return ranges


def check_ranges(ranges: list[range], num_blocks: int) -> None:
    """The ranges cover blocks 0..num_blocks-1 in order, each stage at least one block."""
    flat = [index for r in ranges for index in r]
    if flat != list(range(num_blocks)) or any(len(r) == 0 for r in ranges):
        raise RecipeError(f"pipeline stage ranges {[(r.start, r.stop) for r in ranges]} must cover the {num_blocks} "
                          "blocks in order, at least one block per stage")


class StageBlocks(nn.ModuleList):
    """Some of a model's blocks, registered under their indices in the whole model, so that
    parameter names (and so checkpoint keys and PEFT adapter keys) are those of the whole model.
    Iteration and slicing are positional, which is what the transformers forwards use."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __getitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            return nn.ModuleList(modules[index])
        return modules[index]


def _blocks_list(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute name, list) of the backbone's decoder blocks (bytetune.quant_layers.blocks)."""
    try:
        name, blocks = decoder_block_list(backbone)
    except NoDecoderBlocks as error:
        raise RecipeError(f"{error}; the pipeline cannot split it") from None
    if "." in name or not name:
        raise RecipeError(f"{type(backbone).__name__}'s decoder blocks ({name or 'the backbone itself'}) are not a "
                          "list attribute of the backbone: the pipeline cannot split it")
    return name, blocks


def _parts(peft_model):
    """(causal LM, backbone, architecture entry)."""
    inner = peft_model.get_base_model()
    model_type = inner.config.model_type
    if model_type not in ARCHITECTURES:
        raise RecipeError(f"model type {model_type!r} is not supported by the pipeline yet (supported: "
                          f"{', '.join(sorted(ARCHITECTURES))})")
    return inner, getattr(inner, inner.base_model_prefix), ARCHITECTURES[model_type]


def num_blocks_of(peft_model) -> int:
    inner, backbone, _ = _parts(peft_model)
    return len(_blocks_list(backbone)[1])


def prune_to_stage(peft_model, blocks: range, first: bool, last: bool) -> None:
    """Drop every module stage (blocks, first, last) does not run, in place."""
    inner, backbone, (embeddings, after_embeddings, final) = _parts(peft_model)
    list_name, all_blocks = _blocks_list(backbone)
    setattr(backbone, list_name, StageBlocks({index: all_blocks[index] for index in blocks}))
    if not first:
        for name in embeddings:
            setattr(backbone, name, None)
        for name in after_embeddings:
            setattr(backbone, name, nn.Identity())
    if not last:
        for name in final:
            setattr(backbone, name, nn.Identity())
        head_name = next(name for name, child in inner.named_children() if child is inner.get_output_embeddings())
        setattr(inner, head_name, None)
    elif not first:
        _untie_int8_head(inner)


def _untie_int8_head(inner: nn.Module) -> None:
    """quantization.embeddings=int8 on a last stage that dropped the embeddings: its tied
    Int8Head would read the scales of a table this process no longer holds. It becomes an untied
    Int8Head of its own (codes and scales of the same table, read under the embeddings' name in
    the checkpoint), which is what the tied one computes."""
    head = inner.get_output_embeddings()
    if isinstance(head, Int8Head) and head.tied:
        inner.set_output_embeddings(head.untied_copy())


class HostEmbedding(nn.Module):
    """parallel.pipeline.cpu_embeddings: the first stage's input-embedding table stays in host
    memory and the lookup runs there; only the looked-up rows (micro_batch x seq_len x hidden) go
    to the stage's device, as the planner assumes (bytetune/plan/pipeline.py)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids.to(self.table.weight.device)).to(input_ids.device)

    def _apply(self, fn, recurse=True):
        return self  # stays in host memory (and its dtype) whatever .to() the stage is given


def _take_embeddings(peft_model) -> tuple[str, nn.Module]:
    """Detach the first stage's input-embedding module from the backbone (name, module)."""
    _, backbone, (embeddings, _, _) = _parts(peft_model)
    name = embeddings[0]
    table = getattr(backbone, name)
    setattr(backbone, name, None)
    return name, table


class StageModule(nn.Module):
    """One stage's forward: token ids (first stage) or the previous stage's hidden states in,
    hidden states out (after the final norm on the last stage). The transformers backbone runs
    as it does in one process, over the blocks this stage kept."""

    def __init__(self, peft_model, first: bool, last: bool):
        super().__init__()
        self.peft_model = peft_model
        self.first, self.last = first, last

    @property
    def backbone(self) -> nn.Module:
        return self.backbone_of(self.peft_model)

    @staticmethod
    def backbone_of(peft_model) -> nn.Module:
        inner = peft_model.get_base_model()
        return getattr(inner, inner.base_model_prefix)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        out = self.backbone(**inputs, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def summed_loss(self, hidden: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
        """Last stage: the summed next-token cross-entropy of the hidden states (trainer/loss.py's
        fused or plain path, as one process computes it)."""
        head = self.peft_model.get_base_model().get_output_embeddings()
        if fused and isinstance(head, nn.Linear) and head.bias is None:
            return _head_loss(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1))
        return _summed_ce_of_logits(head(hidden), labels)


def build_stage(cfg, stage: int, stages: int, device: torch.device, ranges: list[range] | None = None):
    """(StageModule, tokenizer, info) for pipeline stage ``stage`` of ``stages``.

    ``ranges``: block ranges per stage (the planner's placement); default :func:`split_blocks`.
    ``info``: "ranges", "fingerprint_shapes" (trainable names and shapes of the whole model),
    "bytes_read" (checkpoint bytes this stage read; None when built from a config)."""
    local = can_load_stage_only(cfg)
    repo_id = hub_model_id(cfg)
    if repo_id is not None:
        cfg = with_local_model(cfg, hub_snapshot(repo_id))
    # the whole model on the meta device (a from_config model is drawn whole: its random init is
    # the seed's), LoRA of every block drawn in the one-process order
    deferred = DeferredBase(Path(resolve_model_dir(cfg.model.name_or_path))) if local else None
    model, tokenizer = build_model(cfg, deferred=deferred)
    total = num_blocks_of(model)
    check_pipeline_layout(cfg, stages // pipeline_stages_per_rank(cfg), total)  # p*V stages for these blocks
    ranges = list(ranges) if ranges is not None else default_ranges(cfg, model.get_base_model().config, total, stages)
    check_ranges(ranges, total)
    if len(ranges) != stages:
        raise RecipeError(f"{len(ranges)} stage ranges for {stages} pipeline processes")
    shapes = sorted((n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad)
    aliases = tied_aliases(model.get_base_model())
    if cfg.training.gradient_checkpointing:
        # before pruning: transformers reaches for the input embeddings, which later stages drop
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    first, last = stage == 0, stage == stages - 1
    prune_to_stage(model, ranges[stage], first, last)
    # the first stage's table out of the model while it is moved to (or allocated on) the device
    host = _take_embeddings(model) if first and not last and cfg.parallel.pipeline.cpu_embeddings else None
    bytes_read = None
    if deferred is not None:
        directory = deferred.directory
        reader = deferred.load(model, device, aliases)
        bytes_read = reader.bytes_read
        if host is not None:
            name, table = host
            table.to_empty(device="cpu")
            prefix = model.get_base_model().base_model_prefix
            checkpoint = SafetensorsCheckpoint(directory)
            key = checkpoint.key_for(f"{prefix}.{name}.weight", prefix)
            if key is None:
                raise FileNotFoundError(f"{directory} has no tensor for {prefix}.{name}.weight")
            load_table(table, checkpoint, key)
            bytes_read += checkpoint.bytes_read
    else:
        model.to(device)
    if host is not None:
        name, table = host
        setattr(StageModule.backbone_of(model), name, HostEmbedding(table.to("cpu")))
    info = {"ranges": ranges, "fingerprint_shapes": shapes, "bytes_read": bytes_read}
    return StageModule(model, first, last), tokenizer, info


# --------------------------------------------------------------------------------- the trainer
class PipelineTrainer(Trainer):
    """The Trainer's loop (train(), logging, summary) over the pipeline stages of this process:
    one (1f1b, gpipe) or V = parallel.pipeline.stages_per_rank (interleaved_1f1b).

    ``stages``: the pipeline's stages (p*V); ``ranks``: its processes (p); ``stage_indices``: this
    rank's stages (rank, rank+p, ...); ``stage_modules`` / ``models``: theirs, in that order;
    ``model``: the first of them (config, adapter config); ``stage_module``: the last of them
    (on the last rank, the one computing the loss)."""

    def __init__(self, cfg, ranges: list[range] | None = None, start: RunStart | None = None):
        from accelerate.utils import set_seed
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.cfg = cfg
        # from_config found the checkpoint to resume and chose the threads; else find them now
        self._start = start if start is not None else _start_of_run(cfg)
        self.threads = self._start.threads
        self.fsdp = False
        self.memory_plan = None  # the planner's pipeline model is `python -m bytetune.plan ... parallel=pipeline`
        self.accelerator = _accelerator(PRECISION_TO_ACCELERATE[cfg.training.precision])
        if not dist.is_initialized():
            raise RecipeError("parallel.strategy=pipeline needs a process group: start with torchrun "
                              "--nproc_per_node N train.py ... (or accelerate launch --num_processes N)")
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()
        check_pipeline_recipe(cfg, self.ranks)
        self.stages = self.ranks * pipeline_stages_per_rank(cfg)
        self.stage_indices = list(range(self.rank, self.stages, self.ranks))
        device = self.accelerator.device
        repo_id = hub_model_id(cfg)
        if repo_id is not None:
            # one process downloads (into the shared cache); the others find it there
            if self.rank == 0:
                hub_snapshot(repo_id)
            dist.barrier()
        # each of this rank's stages is a model of its own, holding only that stage's blocks
        self.stage_modules, self.bytes_read = [], None
        for stage in self.stage_indices:
            module, self.tokenizer, info = build_stage(cfg, stage, self.stages, device, ranges)
            ranges = info["ranges"]  # the planner's split, computed once
            self.stage_modules.append(module)
            if info["bytes_read"] is not None:
                self.bytes_read = (self.bytes_read or 0) + info["bytes_read"]
        self.ranges = ranges
        self.rank_ranges = [self.ranges[stage] for stage in self.stage_indices]
        self._fingerprint_shapes = info["fingerprint_shapes"]
        self.first, self.last = self.stage_modules[0].first, self.stage_modules[-1].last
        self.stage_module = self.stage_modules[-1]
        self.models = [module.peft_model for module in self.stage_modules]
        self.model = self.models[0]
        self.train_data = build_token_blocks(cfg.data, self.tokenizer, cfg.training.seq_len, "train")
        self.eval_data = build_token_blocks(cfg.data, self.tokenizer, cfg.training.seq_len, "eval") if cfg.data.eval else None
        self.output_dir = Path(cfg.output_dir)
        # device_specific: each stage draws its own dropout masks, reproducibly
        set_seed(cfg.training.seed, device_specific=True)

        training = cfg.training
        self.world = 1  # data-parallel replicas: every stage reads the same rows
        self.micro_batches = micro_batches(cfg)
        self.global_batch = training.micro_batch_size * self.micro_batches
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training split has {len(self.train_data)} sequences, fewer than one global batch "
                f"(micro_batch_size {training.micro_batch_size} x {self.micro_batches} pipeline micro-batches): "
                "add data or lower the batch size"
            )
        self.total_steps = training.max_steps or max(1, math.ceil(training.epochs * self.steps_per_epoch))
        trainable = [p for model in self.models for p in model.parameters() if p.requires_grad]
        if not trainable:
            blocks = ", ".join(f"{r.start}-{r.stop - 1}" for r in self.rank_ranges)
            raise RecipeError(f"pipeline rank {self.rank} (blocks {blocks}) has no trainable parameters: check "
                              "lora.target_modules and lora.layers")
        self.trainable = trainable
        # one optimizer over all of this rank's stages (its states are per tensor)
        self.optimizer = build_optimizer(trainable, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.schedule)
        self.pipeline_stages = [PipelineStage(module, stage, self.stages, device)
                                for module, stage in zip(self.stage_modules, self.stage_indices)]
        schedule = cfg.parallel.pipeline.schedule
        if schedule == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.pipeline_stages, n_microbatches=self.micro_batches,
                                                    loss_fn=self._micro_batch_loss, scale_grads=False)
        else:
            schedule_class = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
            self.schedule = schedule_class(self.pipeline_stages[0], n_microbatches=self.micro_batches,
                                           loss_fn=self._micro_batch_loss, scale_grads=False)
        self._normalizer = torch.ones((), device=device)
        self._summed: list[torch.Tensor] = []
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0
        self.history = []
        self.eval_history = []
        self._permutation = None
        self._log_file = None
        self._tensorboard = None

    @classmethod
    def from_recipe(cls, name_or_path, ranges: list[range] | None = None, **overrides) -> "PipelineTrainer":
        from bytetune.recipe import load_recipe

        return cls.from_config(load_recipe(name_or_path, overrides), ranges)

    @classmethod
    def from_config(cls, cfg, ranges: list[range] | None = None) -> "PipelineTrainer":
        # Everything that can fail cheaply fails before the model loads (and before any process
        # group is needed): the same checks as Trainer.from_config, then the pipeline's own.
        start = preflight(cfg)
        check_pipeline_recipe(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return cls(cfg, ranges, start=start)

    # ------------------------------------------------------------------------ identity
    parallel_mode = STRATEGY_PIPELINE
    data_rank = 0

    def model_fingerprint(self) -> dict:
        config = self.model.get_base_model().config
        return {
            "base": self.cfg.model.name_or_path,
            "model_type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": getattr(config, "hidden_size", None),
            "adapters": hashlib.sha256(repr(self._fingerprint_shapes).encode()).hexdigest()[:16],
        }

    def layout(self) -> dict:
        return {"stages": self.stages, "blocks": [[r.start, r.stop] for r in self.ranges],
                "schedule": self.cfg.parallel.pipeline.schedule, "micro_batches": self.micro_batches,
                "stages_per_rank": self.stages // self.ranks}

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """This rank's trainable parameters (all its stages) by their whole-model names."""
        return {n: p for model in self.models for n, p in model.named_parameters() if p.requires_grad}

    def stage_state(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's trainable tensors (all its stages) by their whole-model names, on CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.named_trainable().items()}

    def full_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Every stage's trainable tensors, on rank 0 (None elsewhere); collective."""
        parts = [None] * self.ranks if self.rank == 0 else None
        dist.gather_object(self.stage_state(), parts, dst=0)
        if self.rank != 0:
            return None
        return {name: tensor for part in parts for name, tensor in part.items()}

    def adapter_digest(self) -> str:
        state = self.full_adapter_state()
        digest = [None]
        if self.rank == 0:
            sha = hashlib.sha256()
            for name, weight in sorted(state.items()):
                sha.update(name.encode())
                sha.update(weight.float().numpy().tobytes())
            digest = [sha.hexdigest()]
        dist.broadcast_object_list(digest, src=0)
        return digest[0]

    def generate(self, *args, **kwargs):
        raise TrainingError("generate() needs the whole model in one process: under the pipeline run "
                            "`python -m bytetune.generate recipe=... adapter=DIR` on the saved adapter")

    def held_out_sample(self, *args, **kwargs):
        return None

    # ------------------------------------------------------------------------ training
    def _micro_batch_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        summed = self.stage_module.summed_loss(hidden, labels, self.cfg.training.fused_cross_entropy)
        self._summed.append(summed.detach().float())
        return summed / self._normalizer.to(summed.device)

    def _all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _train_step(self) -> tuple[float, int]:
        device = self.accelerator.device
        for model in self.models[1:]:  # the loop sets the first model's mode; the rank's other stages follow
            model.train(self.model.training)
        batches = [self._micro_batch(self.step, micro) for micro in range(self.micro_batches)]
        step_targets = sum(target_token_count(batch["labels"]) for batch in batches).to(device)
        # every stage reads the same rows, so every stage knows the step's normalizer
        self._normalizer = step_targets.clamp_min(1).float()
        self._summed = []
        whole = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        args = (whole["input_ids"],) if self.first else ()
        target = whole["labels"] if self.last else None
        with self.accelerator.autocast():
            self.schedule.step(*args, target=target, attention_mask=whole["attention_mask"], return_outputs=False)
        # The schedule's first step also runs the loss once on placeholder tensors before the
        # micro-batches (metadata inference: shapes and dtypes of the gradients to receive), so
        # the step's own losses are the last ones recorded.
        if self.last and len(self._summed) not in (self.micro_batches, self.micro_batches + 1):
            raise TrainingError(f"the pipeline schedule computed {len(self._summed)} micro-batch losses, "
                                f"expected {self.micro_batches}")
        summed = self._summed[-self.micro_batches:]
        loss_sum = torch.stack(summed).sum() if self.last else torch.zeros((), device=device)
        loss_sum = self._all_sum(loss_sum.reshape(1).float())
        tokens = int(whole["attention_mask"].sum())
        mean_loss = (loss_sum.sum() / step_targets.clamp_min(1)).item()
        if not torch.isfinite(loss_sum).all():
            # every stage sees the same reduced sum, so all skip together
            self._skip_nonfinite_step(mean_loss)
            return mean_loss, tokens
        if self.cfg.training.max_grad_norm is not None:
            self.clip_grad_norm_(self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, tokens

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ over the parameters of all stages: the norm of the
        per-tensor norms, from the all-reduced sum of each stage's squared norms."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        device = self.accelerator.device
        squared = torch.zeros(1, device=device)
        if grads:
            squared += torch.stack([torch.linalg.vector_norm(g, 2.0).float() for g in grads]).pow(2).sum()
        total = self._all_sum(squared).sqrt()[0]
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))
        return total

    # ------------------------------------------------------------------------ evaluation
    def _send(self, tensor: torch.Tensor, to: int) -> None:
        codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
        dist.send(torch.tensor([codes[tensor.dtype]], device=tensor.device), dst=to)
        dist.send(tensor.contiguous(), dst=to)

    def _recv(self, shape, source: int) -> torch.Tensor:
        device = self.accelerator.device
        code = torch.zeros(1, dtype=torch.long, device=device)
        dist.recv(code, src=source)
        tensor = torch.empty(shape, dtype=(torch.float32, torch.bfloat16, torch.float16)[int(code)], device=device)
        dist.recv(tensor, src=source)
        return tensor

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted held-out loss, forward through the stages (every stage calls this)."""
        if self.eval_data is None:
            raise RecipeError("no held-out data: set data.eval or pass eval_data")
        was_training = self.model.training
        for model in self.models:
            model.eval()
        device = self.accelerator.device
        size = self.cfg.eval.batch_size
        n_batches = math.ceil(len(self.eval_data) / size)
        if self.cfg.eval.max_batches is not None:
            n_batches = min(n_batches, self.cfg.eval.max_batches)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
        hidden_size = self.model.get_base_model().config.hidden_size
        for index in range(n_batches):
            rows = self.eval_data.batch(torch.arange(index * size, min((index + 1) * size, len(self.eval_data))))
            rows = {key: value.to(device) for key, value in rows.items()}
            shape = (*rows["input_ids"].shape, hidden_size)
            # stage s runs on rank s % p: this rank's stages in order, each receiving from the
            # previous stage's rank and sending to the next one's
            for module, stage in zip(self.stage_modules, self.stage_indices):
                x = rows["input_ids"] if module.first else self._recv(shape, (stage - 1) % self.ranks)
                with self.accelerator.autocast():
                    hidden = module(x, attention_mask=rows["attention_mask"])
                    if module.last:
                        summed = module.summed_loss(hidden, rows["labels"], self.cfg.training.fused_cross_entropy)
                if not module.last:
                    self._send(hidden, (stage + 1) % self.ranks)
                else:
                    totals += torch.stack([summed.double(), target_token_count(rows["labels"]).double()])
        totals = self._all_sum(totals)
        if was_training:
            for model in self.models:
                model.train()
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[1].item())}

    # ------------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        state = super()._trainer_state()
        state["world_size"] = self.ranks
        state["pipeline"] = self.layout()
        return state

    def _write_peft_adapter(self, directory: Path, with_tokenizer: bool) -> None:
        """One ordinary PEFT adapter of the whole model (collective; rank 0 writes). Every stage
        converts its own adapters to PEFT's file keys (PEFT reads them off the modules it has),
        rank 0 writes the config and the union of the weights."""
        from peft import get_peft_model_state_dict
        from peft.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

        mine = {k: v.detach().cpu().contiguous() for model in self.models for k, v in
                get_peft_model_state_dict(model, save_embedding_layers=False).items()}
        parts = [None] * self.ranks if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank != 0:
            return
        weights = {k: v for part in parts for k, v in part.items()}
        # no embedding layers: bytetune never resizes them (see Trainer.save_adapter)
        self.model.save_pretrained(str(directory), save_embedding_layers=False)
        save_file(weights, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        if with_tokenizer and self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def save_checkpoint(self) -> Path:
        temporary = ckpt.temporary_dir(self.output_dir, self.step)
        if self.rank == 0:
            ckpt.begin(self.output_dir, self.step)
        dist.barrier()
        ckpt.write_rank_rng(temporary, self.rank)
        self._write_peft_adapter(temporary, with_tokenizer=False)
        torch.save({"adapter": self.stage_state(), "optimizer": self.optimizer.state_dict()},
                   temporary / STAGE_FILE.format(self.rank))
        dist.barrier()
        final = ckpt.final_dir(self.output_dir, self.step)
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), temporary / "scheduler.pt")
            (temporary / ckpt.STATE_FILE).write_text(json.dumps(self._trainer_state(), indent=1))
            self._commit_checkpoint(temporary, final)
        self._set_aside_newer = None  # every stage: the next save sets nothing aside
        dist.barrier()
        return final

    def load_checkpoint(self, checkpoint: Path) -> None:
        state = ckpt.read_state(checkpoint)
        mine = self.model_fingerprint()
        if state["fingerprint"] != mine:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint} is from a different model ({state['fingerprint']['base']}, "
                f"{state['fingerprint']['model_type']}, adapters {state['fingerprint']['adapters']}) than this run "
                f"({mine['base']}, {mine['model_type']}, adapters {mine['adapters']}): resume with the same recipe"
            )
        saved_layout = state.get("pipeline", {})
        if (saved_layout.get("blocks"), saved_layout.get("stages_per_rank", 1)) != (
                self.layout()["blocks"], self.layout()["stages_per_rank"]):
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint} was written by pipeline stages {state.get('pipeline')}, this run has "
                f"{self.layout()}: resume with the same number of processes and stage split"
            )
        ckpt.check_recipe_matches(checkpoint, state, self._identity())
        path = checkpoint / STAGE_FILE.format(self.rank)
        if not path.is_file():
            raise ckpt.CheckpointError(f"checkpoint {checkpoint} has no {path.name}: it was not written by this pipeline")
        saved = torch.load(path, weights_only=False)
        params = self.named_trainable()
        if saved["adapter"].keys() != params.keys():
            raise ckpt.CheckpointError(f"{path} holds other adapters than rank {self.rank}'s stages have")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved["adapter"][name])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        ckpt.load_rank_rng(checkpoint, self.rank)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.history = state["history"]
        self.eval_history = state["eval_history"]

    def save_adapter(self, directory: str | Path | None = None) -> Path:
        """The whole model's adapters as one ordinary PEFT adapter, written by rank 0."""
        directory = Path(directory) if directory is not None else self.output_dir / "adapter"
        self._write_peft_adapter(directory, with_tokenizer=True)
        dist.barrier()
        return directory
