"""bytetune.Trainer: LoRA fine-tuning loop on accelerate.

The Accelerator places the model (unless a device map already split it over several devices),
runs mixed-precision autocast, and wraps the model in DDP when several processes run. Gradient
accumulation is done here (no_sync on all but the last micro-batch) rather than by accelerate's
counter, so that a resumed run continues from a step number alone. The data order is a pure
function of (seed, epoch, step): every global batch is a slice of a seeded permutation, which is
what makes a resumed run indistinguishable from an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, is_initialized
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from tqdm.auto import tqdm
from transformers import get_scheduler

from bytetune import optim as bytetune_optim
from bytetune.loaders.data import DataError, as_token_blocks, build_token_blocks, check_data_files
from bytetune.loaders.generation import before_and_after, complete
from bytetune.loaders.models import build_base, check_before_loading, check_lora_targets
from bytetune.plan.runtime import check_fits, memory_report, plan_for_run
from bytetune.quant_layers import dequantize_model
from bytetune.quant_layers.convert import forget_quantization
from bytetune.quant_layers.int8_experts import router_names
from bytetune.quant_layers.group_lora import register_zeroquant_lora
from bytetune.quant_layers.loading import DeferredBase
from bytetune.quant_layers.lora import export_merged
from bytetune.recipe import RecipeConfig, RecipeError, check_local_paths, load_recipe, torch_dtype, validate
from bytetune.trainer import checkpoint as ckpt
from bytetune.trainer import distributed
from bytetune.trainer.loss import summed_token_loss, target_token_count
from bytetune.trainer.threads import apply_threads

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


# The summary's before/after completion: the first held-out tokens as the prompt, a short answer.
SAMPLE_PROMPT_TOKENS = 48
SAMPLE_NEW_TOKENS = 24


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses)."""

    exit_status = 2


class TrainingInterrupted(TrainingError):
    """Ctrl-C: the run stopped with nothing half-written; the message says how to resume."""

    exit_status = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C


def build_model(cfg: DictConfig, device_map: dict | None = None, deferred: DeferredBase | None = None):
    """(PEFT model, tokenizer): base model, int8 base layers if asked, LoRA adapters.
    ``device_map`` (the memory planner's) replaces the recipe's ``model.device_map``; a
    ``deferred`` base is built on the meta device, for ``deferred.load`` to fill later (each FSDP
    rank its shards, each pipeline stage its blocks)."""
    model, tokenizer = build_base(cfg, device_map, deferred=deferred)
    targets = list(cfg.lora.target_modules)
    routers = router_names(model)
    if targets == ["all-linear"] and (cfg.lora.layers is not None or routers):
        # PEFT takes layers_to_transform only with named targets: name every linear of the blocks.
        # On an MoE model this also keeps LoRA off the routers, which PEFT's "all-linear" (through
        # its transformers-v4 name mapping) would adapt.
        head = model.get_output_embeddings()
        router_leaves = {name.rsplit(".", 1)[-1] for name in routers}
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and module is not head and name not in routers}
                         - router_leaves)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        layers_to_transform=list(cfg.lora.layers) if cfg.lora.layers is not None else None,
        target_parameters=list(cfg.lora.target_parameters) or None,
        task_type="CAUSAL_LM",
    )
    # PEFT wraps Int8Linear / GroupQuantLinear with bytetune's LoRA layers (registered per config)
    lora = register_zeroquant_lora(lora)
    check_lora_targets(model, lora, cfg.lora)  # one line naming the modules that exist, not PEFT's traceback
    torch.manual_seed(cfg.training.seed)  # the adapters' initial weights are part of the run
    peft_model = get_peft_model(model, lora)
    # Saved adapters name their base as the recipe does (a hub id), not as the path it happened to
    # load from here (a GGUF cache, a site-packages directory), so that they load elsewhere.
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model.hub_id or cfg.model.name_or_path
    return peft_model, tokenizer


def build_optimizer(params: list[torch.nn.Parameter], opt_cfg) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params``; ``adamw`` is torch's 32-bit AdamW (the peer)."""
    betas = tuple(opt_cfg.betas)
    if opt_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=opt_cfg.lr, betas=betas, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    classes = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "lion8bit": "Lion8bit", "sgd8bit": "SGD8bit"}
    cls = getattr(bytetune_optim, classes[opt_cfg.name])
    common = dict(weight_decay=opt_cfg.weight_decay, optim_bits=opt_cfg.optim_bits,
                  min_8bit_size=opt_cfg.min_8bit_size, block_size=opt_cfg.block_size)
    if opt_cfg.name == "sgd8bit":
        return cls(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, **common)
    if opt_cfg.name == "lion8bit":
        return cls(params, lr=opt_cfg.lr, betas=betas, **common)
    return cls(params, lr=opt_cfg.lr, betas=betas, eps=opt_cfg.eps, **common)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, sched_cfg):
    """transformers' schedule for the recipe: linear warmup from 0, then cosine or linear decay to
    ``min_lr_ratio`` at ``total_steps``, or constant."""
    warmup, floor = sched_cfg.warmup_steps, sched_cfg.min_lr_ratio
    if sched_cfg.name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    if sched_cfg.name == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"min_lr_rate": floor})
    # warmup-stable-decay with no stable phase is the linear decay that can stop at a floor
    return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs={"num_decay_steps": max(0, total_steps - warmup),
                                                    "min_lr_ratio": floor, "decay_type": "linear"})


def _accelerator(mixed_precision: str):
    """An Accelerator; a second Trainer in one process may ask for another precision.

    accelerate keeps one process-wide state and refuses a changed precision. In a single process
    nothing depends on the old precision once its Trainer is done, so the state is rebuilt; in a
    distributed run the precision is fixed by the launcher and must not change.
    """
    if is_initialized():
        state = AcceleratorState()
        if state.mixed_precision != mixed_precision and state.num_processes == 1:
            # accelerate's own test utilities reset the state this way between runs
            AcceleratorState._reset_state()
            GradientState._reset_state()
    # cpu=True on a machine without CUDA: that is what lets several processes started by torchrun
    # (accelerate launch --multi_gpu --num_processes N) form a gloo DDP group instead of N copies.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class RunStart:
    """What a trainer starts its run from, found before its model loads: the checkpoint to resume
    (None: a fresh run) and the thread choice ({"threads", "rule"})."""

    resume_from: Path | None
    threads: dict


def _start_of_run(cfg: DictConfig) -> RunStart:
    """Find the checkpoint to resume (once per run: ``previous_intact`` verifies checkpoints) and
    set this process's intra-op thread count (bytetune/trainer/threads.py); a resumed run takes
    the count its checkpoint recorded, so it ends bitwise where an uninterrupted one would. Reads
    the checkpoint, so a damaged or foreign one fails here, early."""
    recorded = None
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.output_dir)
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        ckpt.check_recipe_matches(resume_from, state, ckpt.recipe_identity(cfg))
        recorded = state.get("threads")
    return RunStart(resume_from, apply_threads(cfg.training.threads, recorded))


@contextlib.contextmanager
def _removed_on_failure(temporary: Path, main: bool):
    """Remove the temporary folder of a write that failed or was interrupted."""
    try:
        yield
    except BaseException:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def _as_recipe(config: Any) -> DictConfig:
    """A validated DictConfig from a DictConfig, a RecipeConfig or a plain nested dict."""
    schema = OmegaConf.structured(RecipeConfig)
    if isinstance(config, RecipeConfig):
        config = OmegaConf.structured(config)
    try:
        cfg = OmegaConf.merge(schema, config)
        if OmegaConf.is_missing(cfg, "name"):  # a config written for a model built by hand
            cfg.name = "bytetune"
        OmegaConf.resolve(cfg)
    except Exception as error:
        raise RecipeError(f"invalid trainer config: {str(error).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def preflight(cfg: DictConfig) -> RunStart:
    """The checks every trainer (one process, DDP, FSDP, pipeline) runs before its model loads:
    the run folder (another run in it, a file in its place, read-only), the checkpoint to resume
    (damaged, another run's), what FSDP cannot do, the paths and data files the recipe names,
    seq_len and LoRA targets against the model's config. Returns the run's start (``_start_of_run``),
    which the trainer takes over instead of finding it again."""
    ckpt.check_run_dir(cfg.output_dir, cfg.checkpoint.resume, cfg.checkpoint.overwrite, ckpt.recipe_identity(cfg))
    start = _start_of_run(cfg)
    if cfg.parallel.strategy != "pipeline" and distributed.use_fsdp(cfg):
        distributed.check_fsdp_recipe(cfg)
    check_local_paths(cfg)  # missing files fail before the model loads (minutes, for big models)
    check_data_files(cfg.data)  # and so do their bad rows
    check_before_loading(cfg)  # seq_len and LoRA targets against the model's config
    return start


def _refuse_pipeline_processes(cfg) -> None:
    if cfg.parallel.strategy == "pipeline" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one stage per process is bytetune/trainer/pipeline.py's PipelineTrainer
        raise RecipeError("parallel.strategy=pipeline under several processes: build the trainer with "
                          "bytetune.trainer.pipeline.PipelineTrainer (train.py does)")


class Trainer:
    """Fine-tune the adapters of a PEFT model.

    ``train_data`` / ``eval_data``: :class:`~bytetune.loaders.data.TokenBlocks`, a dict of
    ``[n, seq_len]`` tensors, or a sequence of dicts with ``input_ids`` (and optionally ``labels``,
    ``attention_mask``). ``config``: a recipe (DictConfig from :func:`load_recipe`, a
    :class:`RecipeConfig`, or a nested dict over the schema's defaults).
    """

    def __init__(self, model, tokenizer, train_data, config, eval_data=None, memory_plan="auto",
                 start: RunStart | None = None, deferred_base: DeferredBase | None = None):
        # deferred_base: the model's base was built empty (build_model(..., deferred=...)); FSDP
        # fills each rank's shards of it from there
        if not isinstance(model, PeftModel):
            raise TypeError("Trainer trains adapters only: pass a PEFT model (peft.get_peft_model or Trainer.from_recipe)")
        self.cfg = _as_recipe(config)
        self.fsdp = distributed.use_fsdp(self.cfg)
        if distributed.fsdp_requested(self.cfg) and not self.fsdp:
            warnings.warn("FSDP was asked for but this is the only process: nothing to shard over, training unsharded "
                          "(launch one process per GPU: accelerate launch --config_file "
                          "bytetune/recipe/accelerate/fsdp2.yaml train.py ...)")
        if self.fsdp:
            if start is None:  # from_config's preflight checked it before the model loaded
                distributed.check_fsdp_recipe(self.cfg)
            memory_plan = None  # the planner does not model FSDP yet
        elif deferred_base is not None:
            raise TypeError("a base built empty (deferred_base) is filled by FSDP's ranks only: this run is not "
                            "sharded, build the model with its weights (build_model(cfg))")
        self.deferred_base = deferred_base
        if self.cfg.parallel.strategy == "pipeline":
            _refuse_pipeline_processes(self.cfg)
            warnings.warn("a pipeline was asked for but this is the only process: one stage, training unsplit "
                          "(launch one process per GPU: torchrun --nproc_per_node N train.py ...)")
        if OmegaConf.is_missing(self.cfg.model, "name_or_path"):  # a model built by hand
            self.cfg.model.name_or_path = model.get_base_model().config.name_or_path or "model"
        # from_config found the checkpoint to resume and chose the threads before the model loaded;
        # a model built by hand: find and choose them now
        start = start if start is not None else _start_of_run(self.cfg)
        self.threads = start.threads
        self._start = start  # the first train() takes its resume_from over (_start_run_dir)
        # The planner's prediction, recorded beside the measured peaks ("auto": plan the model given).
        if memory_plan == "auto":
            memory_plan = plan_for_run(self.cfg, model_config=model.get_base_model().config)
        self.memory_plan = memory_plan
        self.tokenizer = tokenizer
        self.train_data = as_token_blocks(train_data)
        self.eval_data = as_token_blocks(eval_data) if eval_data is not None else None
        self.output_dir = Path(self.cfg.output_dir)
        self.accelerator = _accelerator(PRECISION_TO_ACCELERATE[self.cfg.training.precision])
        # device_specific: each rank draws different dropout masks, reproducibly
        set_seed(self.cfg.training.seed, device_specific=True)

        training = self.cfg.training
        self.world = self.accelerator.num_processes
        self.global_batch = training.micro_batch_size * training.grad_accum_steps * self.world
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training split has {len(self.train_data)} sequences, fewer than one global batch "
                f"(micro_batch_size {training.micro_batch_size} x grad_accum_steps {training.grad_accum_steps} "
                f"x {self.world} processes): add data or lower the batch size"
            )
        self.total_steps = training.max_steps or max(1, math.ceil(training.epochs * self.steps_per_epoch))

        if training.gradient_checkpointing:
            # non-reentrant checkpointing keeps dropout's RNG replayable; input grads give the
            # checkpointed blocks something to differentiate when every base weight is frozen
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        device_map = getattr(model, "hf_device_map", None) or {}
        split = len({str(d) for d in device_map.values()}) > 1
        if self.fsdp:  # sharded here, not by accelerate (see bytetune/trainer/distributed.py)
            self.model = distributed.shard_model(model, self.accelerator.device, self.cfg, deferred_base)
        else:
            self.model = self.accelerator.prepare_model(model, device_placement=not split)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise RecipeError("the model has no trainable parameters: check lora.target_modules")
        self.optimizer = self.accelerator.prepare_optimizer(build_optimizer(trainable, self.cfg.optimizer))
        self.scheduler = build_scheduler(self.optimizer.optimizer, self.total_steps, self.cfg.schedule)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0
        self.history: list[dict] = []  # {"step", "loss", "lr"} for every optimizer step
        self.eval_history: list[dict] = []
        self._permutation: tuple[int, torch.Tensor] | None = None
        self._log_file = None
        self._tensorboard = None

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_recipe(cls, name_or_path, **overrides) -> "Trainer":
        """Load a recipe (``overrides`` as ``{"training.max_steps": 10}`` or nested dicts), build all."""
        cfg = load_recipe(name_or_path, overrides)
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Trainer":
        # Everything that can fail cheaply fails before the model loads: the run folder (another
        # run in it, a file in its place, read-only), the checkpoint to resume (damaged, another
        # run's), the paths the recipe names; a pipeline recipe reaching the plain Trainer.
        _refuse_pipeline_processes(cfg)
        start = preflight(cfg)  # FSDP's own checks included
        fsdp = distributed.use_fsdp(cfg)

        # a recipe that cannot fit fails here, saying what would. The FSDP plan needs the world
        # size and one GPU per process: `python -m bytetune.plan ... parallel=fsdp` plans it.
        plan = None if fsdp else check_fits(cfg)
        split = plan is not None and cfg.model.device_map == "auto" and len(plan.devices) > 1
        # under FSDP a local checkpoint is read shard by shard (each rank holds only its part)
        deferred = distributed.sharded_base(cfg) if fsdp else None
        model, tokenizer = build_model(cfg, device_map=plan.device_map if split else None, deferred=deferred)
        train_data = build_token_blocks(cfg.data, tokenizer, cfg.training.seq_len, "train")
        eval_data = build_token_blocks(cfg.data, tokenizer, cfg.training.seq_len, "eval") if cfg.data.eval else None
        return cls(model, tokenizer, train_data, cfg, eval_data, memory_plan=plan, start=start,
                   deferred_base=deferred)

    # ---------------------------------------------------------------------------------- helpers
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def generate(self, prompt: str, max_new_tokens: int = 32, adapter: bool = True, stream: bool = False,
                 raw: bool = False) -> str:
        """The greedy completion of ``prompt`` by the model as it is now, or by its base alone
        (``adapter=False``). When the run trained on instruction data, the prompt is put in the
        form training gave prompts (the tokenizer's chat template, or data.template) unless
        ``raw``: an instruction fine-tune answers what it was taught to answer."""
        if self.fsdp:
            raise TrainingError("generate() needs the whole model in one process: under FSDP run "
                                "`python -m bytetune.generate recipe=... adapter=DIR` on the saved adapter")
        data_cfg = None if raw else self.cfg.data
        if not adapter:
            with self.unwrapped.disable_adapter():
                return complete(self.unwrapped, self.tokenizer, prompt, max_new_tokens, stream, data_cfg)
        return complete(self.unwrapped, self.tokenizer, prompt, max_new_tokens, stream, data_cfg)

    def held_out_sample(self, prompt_tokens: int = SAMPLE_PROMPT_TOKENS, max_new_tokens: int = SAMPLE_NEW_TOKENS) -> dict | None:
        """The base's and the adapted model's completions of the start of the first held-out
        sequence: what the fine-tune changed, in one line each."""
        if self.eval_data is None or self.tokenizer is None:
            return None
        prompt = self.tokenizer.decode(self.eval_data.input_ids[0, :prompt_tokens], skip_special_tokens=True)
        return before_and_after(self.unwrapped, self.tokenizer, prompt, max_new_tokens)

    def _micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Rows of micro-batch ``micro`` of optimizer step ``step`` for this rank."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.cfg.training.seed * 1_000_003 + epoch)
            self._permutation = (epoch, torch.randperm(len(self.train_data), generator=generator))
        size = self.cfg.training.micro_batch_size
        start = position * self.global_batch + (micro * self.world + self.data_rank) * size
        rows = self.train_data.batch(self._permutation[1][start : start + size])
        return {key: value.to(self.accelerator.device) for key, value in rows.items()}

    @property
    def data_rank(self) -> int:
        """This process's place among the data-parallel replicas (pipeline stages share one)."""
        return self.accelerator.process_index

    @property
    def parallel_mode(self) -> str:
        return "fsdp" if self.fsdp else ("ddp" if self.world > 1 else "none")

    def model_fingerprint(self) -> dict:
        """What a checkpoint must match: the base model and the adapters' names and shapes."""
        config = self.unwrapped.get_base_model().config
        shapes = sorted((n, tuple(p.shape)) for n, p in self.unwrapped.named_parameters() if p.requires_grad)
        return {
            "base": self.cfg.model.name_or_path,
            "model_type": config.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": getattr(config, "hidden_size", None),
            "adapters": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16],
        }

    def adapter_digest(self) -> str:
        """sha256 of the trainable weights (ranks of a DDP run must agree)."""
        digest = hashlib.sha256()
        if self.fsdp:  # every rank gathers the full adapters (collective)
            weights = distributed.trainable_state(self.unwrapped)
        else:
            weights = {n: p.detach() for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        for name, weight in sorted(weights.items()):
            digest.update(name.encode())
            digest.update(weight.float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _truncate_log(self) -> None:
        """Drop log records past the resumed step: an interrupted run logged steps it now redoes
        (and a kill mid-line leaves a last line that does not parse: dropped too)."""
        path = self.output_dir / "log.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        with ckpt.guarded("reading the log", path):
            lines = path.read_text(errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with ckpt.guarded("writing the log", self.output_dir / "log.jsonl"):
            self._write_log(record)

    def _write_log(self, record: dict) -> None:
        if self._log_file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.output_dir / "log.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                if self.cfg.logging.tensorboard:
                    self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tensorboard = None
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted mean loss and perplexity on the held-out data (shared over ranks)."""
        if self.eval_data is None:
            raise RecipeError("no held-out data: set data.eval or pass eval_data")
        was_training = self.model.training
        self.model.eval()
        size = self.cfg.eval.batch_size
        n_batches = math.ceil(len(self.eval_data) / size)
        if self.cfg.eval.max_batches is not None:
            n_batches = min(n_batches, self.cfg.eval.max_batches)
        totals = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)  # loss sum, tokens
        # Under FSDP every forward is collective: all ranks run as many, a rank past the last
        # batch reruns batch 0 and counts nothing.
        rounds = math.ceil(n_batches / self.world) * self.world if self.fsdp else n_batches
        for index in range(self.accelerator.process_index, rounds, self.world):
            counts = index < n_batches
            index = index if counts else 0
            rows = self.eval_data.batch(torch.arange(index * size, min((index + 1) * size, len(self.eval_data))))
            rows = {key: value.to(self.accelerator.device) for key, value in rows.items()}
            with self.accelerator.autocast():
                summed, counted = summed_token_loss(self.model, rows, fused=self.cfg.training.fused_cross_entropy)
            if counts:
                totals += torch.stack([summed.double(), counted.double()])
        totals = self.accelerator.reduce(totals, reduction="sum") if self.world > 1 else totals
        if was_training:
            self.model.train()
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[1].item())}

    def _run_eval(self) -> dict:
        result = {"step": self.step, **self.evaluate()}
        self.eval_history.append(result)
        self._log(result)
        return result

    # ------------------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        epoch, position = divmod(self.step, self.steps_per_epoch)
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "data_position": {"epoch": epoch, "batch_in_epoch": position, "sequences_seen": self.step * self.global_batch},
            "tokens_seen": self.tokens_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self.world,
            "history": self.history,
            "eval_history": self.eval_history,
            "fingerprint": self.model_fingerprint(),
            "recipe": {"hash": ckpt.recipe_hash(self._identity()), "identity": self._identity()},
            "threads": torch.get_num_threads(),
        }

    def _identity(self) -> dict:
        return ckpt.recipe_identity(self.cfg)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step atomically (all ranks must call this). A
        failed write (no space, read-only, Ctrl-C) leaves no partial folder and the previous
        checkpoint as the latest one."""
        temporary = ckpt.temporary_dir(self.output_dir, self.step)
        main = self.accelerator.is_main_process
        previous = ckpt.list_checkpoints(self.output_dir)
        intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint was written"
        try:
            with ckpt.guarded(f"writing the checkpoint of step {self.step} in", temporary, after=intact, library_errors=True):
                if main:
                    ckpt.begin(self.output_dir, self.step)
                self.accelerator.wait_for_everyone()
                ckpt.write_rank_rng(temporary, self.accelerator.process_index)
                if self.fsdp:
                    distributed.write_checkpoint(temporary, self.unwrapped, self.optimizer.optimizer, self.scheduler,
                                                 self._trainer_state(), main)
                elif main:
                    ckpt.write_main(temporary, self.unwrapped, self.optimizer, self.scheduler, self._trainer_state())
                self.accelerator.wait_for_everyone()
                final = ckpt.final_dir(self.output_dir, self.step)
                if main:
                    self._commit_checkpoint(temporary, final)
        except BaseException:
            if main:  # nothing half-written stays behind (the rename never happened)
                ckpt.remove_temporaries(self.output_dir)
            raise
        self.accelerator.wait_for_everyone()
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
        if state["world_size"] != self.world:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint} was written by {state['world_size']} processes, this run has {self.world}: "
                "resume with the same number of processes"
            )
        ckpt.check_recipe_matches(checkpoint, state, self._identity())
        if self.fsdp:
            ckpt.read_checked(checkpoint, distributed.SHARDED_DIR, lambda _: distributed.read_sharded(
                checkpoint, self.unwrapped, self.optimizer.optimizer))
        else:
            if not (checkpoint / "optimizer.pt").is_file():
                raise ckpt.CheckpointError(f"checkpoint {checkpoint} has no optimizer.pt: it was written by an FSDP run; "
                                           "resume it with FSDP and the same number of processes")
            weights = ckpt.read_checked(checkpoint, "adapter_model.safetensors", lambda _: load_peft_weights(
                str(checkpoint), device=str(self.accelerator.device)))
            result = set_peft_model_state_dict(self.unwrapped, weights)
            if getattr(result, "unexpected_keys", None):
                raise ckpt.CheckpointError(f"checkpoint {checkpoint} has adapter weights this model lacks: {result.unexpected_keys[:3]}")
            optimizer_state = ckpt.read_checked(checkpoint, "optimizer.pt", lambda path: torch.load(path, weights_only=False))
            ckpt.read_checked(checkpoint, "optimizer.pt", lambda _: self.optimizer.load_state_dict(optimizer_state))
        scheduler_state = ckpt.read_checked(checkpoint, "scheduler.pt", lambda path: torch.load(path, weights_only=False))
        self.scheduler.load_state_dict(scheduler_state)
        ckpt.load_rank_rng(checkpoint, self.accelerator.process_index)
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
        self.history = state["history"]
        self.eval_history = state["eval_history"]

    def save_adapter(self, directory: str | Path | None = None) -> Path:
        """The adapters in PEFT format (``PeftModel.from_pretrained`` loads them); main process
        writes, into a temporary folder renamed into place (an old adapter stays whole until then)."""
        directory = Path(directory) if directory is not None else self.output_dir / "adapter"
        temporary = directory.with_name(f".tmp-{directory.name}")
        main = self.accelerator.is_main_process
        with ckpt.guarded("writing the adapter", directory, after="the checkpoints are intact", library_errors=True), \
                _removed_on_failure(temporary, main):
            if main and temporary.exists():
                shutil.rmtree(temporary)
            if self.fsdp:
                distributed.save_adapter(self.unwrapped, temporary, main, self.tokenizer)
            elif main:
                # no embedding layers: bytetune never resizes them, and PEFT's "auto" would ask the hub
                # whether the base named in the adapter config has another vocabulary
                self.unwrapped.save_pretrained(temporary, save_embedding_layers=False)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(temporary)
            self.accelerator.wait_for_everyone()
            if main:
                ckpt.replace_dir(temporary, directory)
        self.accelerator.wait_for_everyone()
        return directory

    # --------------------------------------------------------------------------------- training
    def _commit_checkpoint(self, temporary: Path, final: Path) -> None:
        """Main process: after a resume from an older checkpoint, first set aside the ones past
        this step (they belong to the continuation given up on), then rename the written one into
        place and keep the newest ``keep_last``: rotating first counted the abandoned ones and
        deleted this run's older intact checkpoints instead."""
        if getattr(self, "_set_aside_newer", None) is not None:
            moved = ckpt.set_aside_newer(self.output_dir, final)
            if moved:
                warnings.warn(f"resumed from {self._set_aside_newer.name}: the newer checkpoints "
                              f"{', '.join(moved)} belonged to the continuation given up on and were "
                              "renamed superseded-<name>")
            self._set_aside_newer = None
        ckpt.commit(temporary, self.output_dir, self.step, self.cfg.checkpoint.keep_last)

    def _skip_nonfinite_step(self, mean_loss: float) -> None:
        """A step whose reduced loss is not finite updates nothing; too many of them end the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        warnings.warn(f"step {self.step + 1}: non-finite loss {mean_loss}; skipped the update "
                      f"({self.nonfinite_steps}/{self.cfg.training.max_nonfinite_steps} allowed)")
        if self.nonfinite_steps > self.cfg.training.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_steps} steps had non-finite losses (training.max_nonfinite_steps="
                f"{self.cfg.training.max_nonfinite_steps}): lower optimizer.lr or check the data"
            )

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum_steps micro-batches: (loss per target token over all
        ranks, tokens)."""
        accum = self.cfg.training.grad_accum_steps
        batches = [self._micro_batch(self.step, micro) for micro in range(accum)]
        # Every target token of the step weighs the same, however the micro-batches and ranks
        # split them: each micro-batch's summed loss is divided by the step's global count.
        step_targets = sum(target_token_count(batch["labels"]) for batch in batches).to(self.accelerator.device)
        if self.world > 1:
            step_targets = self.accelerator.reduce(step_targets, reduction="sum")
        # DDP averages gradients over ranks; the loss is scaled by world to undo that mean.
        normalizer = step_targets.clamp_min(1).float() / self.world
        loss_sum = torch.zeros((), device=self.accelerator.device)
        tokens = 0
        for micro, batch in enumerate(batches):
            last = micro == accum - 1
            if last:
                sync = contextlib.nullcontext()
            else:
                sync = distributed.no_gradient_sync(self.model) if self.fsdp else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    summed, _ = summed_token_loss(self.model, batch, fused=self.cfg.training.fused_cross_entropy)
                    loss = summed / normalizer
                self.accelerator.backward(loss)
            loss_sum += summed.detach().float()
            tokens += int(batch["attention_mask"].sum())
        losses = self.accelerator.gather(loss_sum.reshape(1)) if self.world > 1 else loss_sum.reshape(1)
        tokens *= self.world
        mean_loss = (losses.sum() / step_targets.clamp_min(1)).item()
        if not torch.isfinite(losses).all():
            # every rank sees the same gathered losses, so all skip together
            self._skip_nonfinite_step(mean_loss)
            return mean_loss, tokens
        if self.cfg.training.max_grad_norm is not None:
            if self.fsdp:  # accelerate clips only models it prepared
                distributed.clip_grad_norm_(self.model, self.cfg.training.max_grad_norm)
            else:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, tokens

    def train(self, stop_after_step: int | None = None) -> dict:
        """Train to the recipe's last step (or stop, with a checkpoint, after ``stop_after_step``).

        Ctrl-C ends it with :class:`TrainingInterrupted` (one line saying how to resume): nothing
        half-written is left, the last checkpoint stays the latest."""
        try:
            return self._train(stop_after_step)
        except KeyboardInterrupt:
            raise self._interrupted() from None
        except BaseException:
            self._close_logs()  # a failed run holds no file open in its folder
            raise

    def _interrupted(self) -> TrainingInterrupted:
        self._close_logs()
        if self.accelerator.is_main_process:
            ckpt.remove_temporaries(self.output_dir)
            for name in ("adapter", "merged"):
                shutil.rmtree(self.output_dir / f".tmp-{name}", ignore_errors=True)
        found = ckpt.list_checkpoints(self.output_dir)
        if found:
            how = f"resume from {found[-1].name} with checkpoint.resume=latest (the same command otherwise)"
        else:
            how = "no checkpoint was written yet: start over with checkpoint.overwrite=true"
        return TrainingInterrupted(f"interrupted (Ctrl-C) after step {self.step} of {self.total_steps}, "
                                   f"nothing half-written left: {how}")

    def _start_run_dir(self) -> Path | None:
        """The checkpoint to resume (None: a fresh run, into a folder that holds no other run, or
        over one with checkpoint.overwrite), then the run's own files: recipe.yaml, run.json."""
        checkpoint_cfg = self.cfg.checkpoint
        if self._start is not None:  # found before the model loaded: the run's first train()
            resume_from, self._start = self._start.resume_from, None
        else:  # a later train() of the same trainer: the checkpoints it wrote count now
            resume_from = ckpt.resolve_resume(checkpoint_cfg.resume, self.output_dir)
        fresh = resume_from is None and self.step == 0
        if fresh:
            ckpt.check_run_dir(self.output_dir, None, checkpoint_cfg.overwrite, self._identity())
        self.accelerator.wait_for_everyone()  # every rank has looked before the main one writes
        main = self.accelerator.is_main_process
        if fresh and checkpoint_cfg.overwrite and main:
            ckpt.clear_run(self.output_dir)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            # checkpoints newer than this one belong to a continuation given up on: set aside
            # once this session has written its first checkpoint (save_checkpoint)
            self._set_aside_newer = resume_from
            self._truncate_log()
        if main:
            with ckpt.guarded("creating output_dir", self.output_dir):
                self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.output_dir / "recipe.yaml", OmegaConf.to_yaml(self.cfg))
            if fresh or not (self.output_dir / ckpt.RUN_FILE).is_file():
                ckpt.write_run_file(self.output_dir, self._identity())
        self.accelerator.wait_for_everyone()
        return resume_from

    def _train(self, stop_after_step: int | None) -> dict:
        self._start_run_dir()
        start_step = self.step
        if self.step == 0 and self.eval_data is not None and self.cfg.eval.at_start:
            self._run_eval()
        end_step = self.total_steps if stop_after_step is None else min(self.total_steps, stop_after_step)
        progress = self._progress_bar(start_step)
        self.model.train()
        started, session_tokens = time.perf_counter(), 0
        window: list[float] = []
        every = self.cfg.checkpoint.every_steps
        saved_at = None
        while self.step < end_step:
            loss, tokens = self._train_step()
            self.step += 1
            self.tokens_seen += tokens
            session_tokens += tokens
            elapsed = time.perf_counter() - started
            lr = self.scheduler.get_last_lr()[0]
            self.history.append({"step": self.step, "loss": loss, "lr": lr})
            window.append(loss)
            tokens_per_s = session_tokens / max(elapsed, 1e-9)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if self.step % self.cfg.logging.every_steps == 0 or self.step == end_step:
                self._log({"step": self.step, "loss": sum(window) / len(window), "lr": lr,
                           "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed})
                window = []
            if self.eval_data is not None and self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0 \
                    and self.step != self.total_steps:
                self._run_eval()
            if (every and self.step % every == 0) or self.step == end_step:
                self.save_checkpoint()
                saved_at = self.step
        if progress is not None:
            progress.close()
        if saved_at != self.step and self.step > start_step:
            self.save_checkpoint()
        wall = time.perf_counter() - started
        if self.step < self.total_steps:  # stopped early on purpose: the checkpoint is the result
            return {"steps": self.step, "stopped_early": True}
        return self._finish(start_step, session_tokens, wall)

    def _progress_bar(self, start_step: int):
        if not (self.cfg.logging.progress_bar and self.accelerator.is_main_process):
            return None
        return tqdm(total=self.total_steps, initial=start_step, desc=self.cfg.name, dynamic_ncols=True)

    def _finish(self, start_step: int, session_tokens: int, wall: float) -> dict:
        final_eval = self._run_eval() if self.eval_data is not None else {}
        adapter_dir = self.save_adapter()
        digests = gather_object([self.adapter_digest()]) if self.world > 1 else [self.adapter_digest()]
        # Measured peaks per device beside the planner's predictions; the headline is the busiest device.
        memory = memory_report(self.memory_plan)
        busiest = max(memory, key=lambda row: row["measured_peak_bytes"])
        last = self.history[-min(10, len(self.history)):]
        summary = {
            "recipe": self.cfg.name,
            "steps": self.step,
            "steps_this_session": self.step - start_step,
            "parallel": self.parallel_mode,
            "tokens": self.tokens_seen,
            "tokens_per_s": session_tokens / max(wall, 1e-9),
            "train_wall_s": wall,
            "peak_memory_bytes": busiest["measured_peak_bytes"],
            "peak_memory_kind": busiest["measured_kind"],
            "memory_per_device": memory,
            "final_train_loss": sum(h["loss"] for h in last) / max(1, len(last)),
            "initial_eval_loss": self.eval_history[0]["eval_loss"] if self.eval_history else None,
            "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_ppl": final_eval.get("eval_ppl"),
            "nonfinite_steps": self.nonfinite_steps,
            "adapter_dir": str(adapter_dir),
            "adapter_sha256_per_rank": digests,
        }
        # generate() bypasses the FSDP root's unsharding hooks: a sharded run leaves the sample
        # to `python -m bytetune.generate` on its saved adapter.
        if self.accelerator.is_main_process and not self.fsdp:
            summary["held_out_sample"] = self.held_out_sample()
        summary["threads"] = self.threads
        if self.cfg.export.merged:
            summary["merged_dir"] = str(self._export_merged())
        if self.accelerator.is_main_process:
            ckpt.atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=1))
            if self.cfg.logging.plot:
                with ckpt.guarded("writing the loss plot", self.output_dir / "loss_curve.png"):
                    self._plot()
            self._close_logs()
        self.accelerator.wait_for_everyone()
        return summary

    def _close_logs(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot is optional
            return
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot([h["step"] for h in self.history], [h["loss"] for h in self.history], label="train loss")
        if self.eval_history:
            axis.plot([e["step"] for e in self.eval_history], [e["eval_loss"] for e in self.eval_history], "o-", label="held-out loss")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        axis.set_title(self.cfg.name)
        axis.legend()
        figure.tight_layout()
        figure.savefig(self.output_dir / "loss_curve.png", dpi=100)
        plt.close(figure)

    def _export_merged(self) -> Path:
        """Base with the adapters merged in, in export.merged_dtype (int8 bases are dequantized)."""
        directory = self.output_dir / "merged"
        # written beside, then renamed into place: a failed export leaves no half a model
        temporary = directory.with_name(".tmp-merged")
        dtype = torch_dtype(self.cfg.export.merged_dtype)
        main = self.accelerator.is_main_process
        with ckpt.guarded("exporting the merged model to", directory, after="the adapter and checkpoints are intact",
                          library_errors=True), \
                _removed_on_failure(temporary, main):
            if main:
                if temporary.exists():
                    shutil.rmtree(temporary)
                # Both paths merge the trainer's own model in place (no copy of a large base): this
                # runs last, after the adapters and the final checkpoint are written.
                if self.cfg.quantization.int8:
                    export_merged(self.unwrapped, temporary, dtype)
                elif self.cfg.quantization.zeroquant:
                    # Dequantize the bases under the adapters, then merge in float: no requantization.
                    dequantize_model(self.unwrapped, dtype=torch.float32)
                    merged = self.unwrapped.merge_and_unload().to(dtype)
                    forget_quantization(merged)
                    merged.save_pretrained(temporary)
                else:
                    self.unwrapped.merge_and_unload().to(dtype).save_pretrained(temporary)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(temporary)
                ckpt.replace_dir(temporary, directory)
        self.accelerator.wait_for_everyone()
        return directory
