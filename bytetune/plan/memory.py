"""Training-memory planner: count the bytes of a LoRA fine-tune before any weight is loaded.

The model is built on the meta device from its transformers config, so a 176B-parameter model
costs no memory and a few seconds. Static memory (weights, LoRA parameters, gradients, optimizer
states) is counted exactly from the meta parameters. Activations are counted by running a short
copy of the model (two blocks, same shapes) forward on the meta device with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for the backward pass
is recorded once per storage, so the count follows the model's real code (eager attention, LoRA
branches, frozen base layers that save nothing for their weights) rather than a hand formula.
The peak is the kept activations plus the largest of the phases that come and go, each sized from
shapes: the loss (logits, log-softmax and its fp32 gradient buffers) and one block's backward
(its recomputed activations under checkpointing, attention-score and MLP gradients).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from bytetune.recipe import torch_dtype

GiB = 1024**3
MiB = 1024**2

# Runtime memory that no tensor count sees. The figures are stated here and printed with every plan.
# CUDA: the context, cuBLAS workspaces and loaded kernels take 0.5-0.8 GiB per device on recent
# GPUs. The caching allocator rounds and fragments: little for tensors allocated once (weights,
# LoRA, optimizer states), more for the activations and temporaries freed and reallocated each step.
CUDA_CONTEXT_BYTES = 768 * MiB
CUDA_SLACK_STATIC = 0.02
CUDA_SLACK_DYNAMIC = 0.20
# CPU: the Python process with torch + transformers imported (about 0.7 GiB RSS here), and glibc's
# allocator keeping freed chunks mapped.
CPU_RUNTIME_BYTES = 1 * GiB
CPU_SLACK_STATIC = 0.02
CPU_SLACK_DYNAMIC = 0.20

# Block-wise 8-bit optimizer layout (bytetune.optim, like bitsandbytes): one uint8 per element per
# state, a float32 absmax per 256-element block per state; tensors below 4096 elements keep fp32.
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096
# LLM.int8() layout (bytetune.Int8Linear): int8 weight [N, K] and a float32 scale per output row.
INT8_SCALE_BYTES = 4
# ZeroQuant layout (bytetune.GroupQuantLinear): INT8 [N, K] or INT4 two per byte [N, K / 2], plus a
# float32 scale per (row, group of group_size input columns).
GROUP_SCALE_BYTES = 4



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
    name: str = "model"

    def __post_init__(self):
        if self.quantization not in ("int8", "zeroquant", "none"):
            raise ValueError(f"quantization={self.quantization!r}: use 'int8', 'zeroquant' or 'none'")
        if self.optimizer_bits not in (8, 32):
            raise ValueError(f"optimizer_bits={self.optimizer_bits}: use 8 or 32")
        if self.seq_len < 1 or self.micro_batch < 1:
            raise ValueError(f"seq_len={self.seq_len}, micro_batch={self.micro_batch}: both must be >= 1")


@dataclass
class Device:
    name: str  # "cuda:0" or "cpu"
    capacity: int  # bytes

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def accelerate_key(self):
        return int(self.name.split(":")[1]) if self.kind == "cuda" else "cpu"


_UNITS = {"gib": GiB, "gb": 10**9, "mib": MiB, "mb": 10**6, "tib": 1024**4, "tb": 10**12, "b": 1}


def parse_size(text: str) -> int:
    low = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * _UNITS[unit])
    raise ValueError(f"size {text!r} has no unit: write e.g. 24GiB, 80GB, 512MiB")


def parse_devices(spec: str | Sequence[Device]) -> list[Device]:
    """'8x24GiB' -> eight CUDA devices; 'cpu:24GiB' -> the CPU; '2x24GiB,1x48GiB' mixes sizes."""
    if not isinstance(spec, str):
        return list(spec)
    devices: list[Device] = []
    for part in spec.split(","):
        part = part.strip()
        if part.lower().startswith("cpu"):
            _, _, size = part.partition(":")
            if not size:
                raise ValueError(f"{part!r}: give the CPU's memory, e.g. cpu:24GiB")
            devices.append(Device("cpu", parse_size(size)))
            continue
        count, sep, size = part.lower().partition("x")
        if not sep or not count.isdigit():
            raise ValueError(f"device spec {part!r}: write COUNTxSIZE, e.g. 8x24GiB (or cpu:24GiB)")
        start = sum(d.kind == "cuda" for d in devices)
        devices += [Device(f"cuda:{start + i}", parse_size(size)) for i in range(int(count))]
    return devices


def runtime_overhead(device: Device, static: int, dynamic: int) -> int:
    """Bytes a device needs beyond the tensors counted: runtime + allocator slack."""
    if device.kind == "cuda":
        return CUDA_CONTEXT_BYTES + int(CUDA_SLACK_STATIC * static + CUDA_SLACK_DYNAMIC * dynamic)
    return CPU_RUNTIME_BYTES + int(CPU_SLACK_STATIC * static + CPU_SLACK_DYNAMIC * dynamic)


def overhead_figures() -> str:
    return (
        f"runtime overhead per device: CUDA {CUDA_CONTEXT_BYTES / MiB:.0f} MiB (context, cuBLAS, kernels); "
        f"CPU {CPU_RUNTIME_BYTES / MiB:.0f} MiB (process with torch); plus allocator slack of "
        f"{CUDA_SLACK_STATIC:.0%} of static and {CUDA_SLACK_DYNAMIC:.0%} of activations + temporaries"
    )


# ----------------------------------------------------------------------------------------------
# The model on the meta device


def build_meta_model(model_config, dtype: str | torch.dtype, num_layers: int | None = None) -> nn.Module:
    """The causal-LM for ``model_config`` on the meta device (no storage), weights tied as configured."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=as_dtype(dtype))
    model.tie_weights()
    return model


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated decoder blocks (the classes in ``model._no_split_modules``), with their names."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules: cannot tell its blocks")
    blocks = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ in classes]
    if not blocks:
        raise ValueError(f"no module of classes {sorted(classes)} in {type(model).__name__}")
    return blocks


def target_linears(block: nn.Module, targets: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The linears of one block that get LoRA (and int8 when quantizing)."""
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all-linear":
        return linears
    wanted = {targets} if isinstance(targets, str) else set(targets)
    chosen = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
    missing = wanted - {n.rsplit(".", 1)[-1] for n, _ in chosen}
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"LoRA targets {sorted(missing)} are not linears of the block; it has {names}")
    return chosen


def _quantized_weight_bytes(name: str, linear: nn.Linear, spec: PlanSpec) -> int:
    n, k = linear.out_features, linear.in_features
    if spec.quantization == "int8":
        return n * k + n * INT8_SCALE_BYTES
    from bytetune.quant_layers.zeroquant import DEFAULT_MODULE_BITS, bits_for

    bits = bits_for(name, spec.zeroquant_bits or DEFAULT_MODULE_BITS)
    groups = math.ceil(k / spec.group_size)
    return n * (k * bits // 8) + n * groups * GROUP_SCALE_BYTES


def optimizer_state_bytes(numel: int, spec: PlanSpec) -> int:
    """Optimizer state of one parameter tensor."""
    if spec.optimizer_bits == 32 or numel < spec.min_8bit_size:
        return spec.optimizer_states * 4 * numel  # fp32 moments
    blocks = math.ceil(numel / spec.optimizer_block)
    return spec.optimizer_states * (numel + 4 * blocks)  # uint8 codes + a float32 absmax per block


@dataclass
class ModuleCost:
    """Memory of one top-level placement unit (a block, the embeddings, the head ...)."""

    name: str
    quantized_weights: int = 0
    other_weights: int = 0
    lora_params: int = 0  # bytes
    lora_grads: int = 0
    optimizer_states: int = 0
    lora_numel: int = 0

    @property
    def static(self) -> int:
        return self.quantized_weights + self.other_weights + self.lora_params + self.lora_grads + self.optimizer_states


def _weight_costs(model: nn.Module, spec: PlanSpec) -> tuple[dict[str, ModuleCost], dict[str, torch.dtype]]:
    """Per placement unit: weights (int8 where quantized) and LoRA bytes; plus the int8 special dtypes
    for accelerate's size count."""
    blocks = block_list(model)
    block_names = {name for name, _ in blocks}
    compute = dtype_bytes(spec.compute_dtype)
    lora_bytes = dtype_bytes(spec.lora_dtype)

    def unit_of(param_name: str) -> str:
        for name in block_names:
            if param_name.startswith(name + "."):
                return name
        # Outside the blocks accelerate places the direct children of the model's submodules.
        return param_name.rsplit(".", 1)[0]

    quantized: dict[str, int] = {}  # weight param name -> bytes of its quantized form
    lora: dict[str, int] = {}
    for bname, block in blocks:
        for lname, linear in target_linears(block, spec.lora_targets):
            lora[f"{bname}.{lname}"] = spec.lora_r * (linear.out_features + linear.in_features)
        if spec.quantization == "none":
            continue
        for lname, linear in target_linears(block, "all-linear"):
            full = f"{bname}.{lname}"
            if not any(full == s or full.endswith("." + s) for s in spec.quantization_skip):
                quantized[f"{full}.weight"] = _quantized_weight_bytes(full, linear, spec)

    costs: dict[str, ModuleCost] = {}
    special: dict[str, torch.dtype] = {}
    seen: set[int] = set()
    for pname, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights are stored once
            continue
        seen.add(id(param))
        unit = costs.setdefault(unit_of(pname), ModuleCost(unit_of(pname)))
        if pname in quantized:
            unit.quantized_weights += quantized[pname]
            # accelerate sizes dtypes in whole bytes: INT4 weights are counted as int8 in its map,
            # the planner's own per-device totals use the true bytes.
            special[pname] = torch.int8
        else:
            unit.other_weights += param.numel() * compute
    for lname, numel in lora.items():
        unit = costs[unit_of(lname + ".weight")]
        r = spec.lora_r
        unit.lora_numel += numel
        unit.lora_params += numel * lora_bytes
        unit.lora_grads += numel * lora_bytes
        # A is [r, K] and B is [N, r]: the 8-bit rule applies per tensor.
        linear = model.get_submodule(lname)
        unit.optimizer_states += optimizer_state_bytes(r * linear.in_features, spec)
        unit.optimizer_states += optimizer_state_bytes(r * linear.out_features, spec)
    return costs, special


# ----------------------------------------------------------------------------------------------
# Activations: what autograd saves, counted on the meta device


@dataclass
class ActivationTrace:
    per_block: int  # saved by one block when it is not checkpointed
    block_input: int  # one block's input hidden states (what a checkpointed block keeps)
    shared: int  # saved once, used by every block (attention mask, ALiBi / rotary tables)
    before_blocks: int  # embeddings side
    after_blocks: int  # final norm, head and loss
    logits: int  # the head's output: alive while the loss is computed (16-bit models add an fp32 copy)
    loss_backward_scratch: int  # gradient buffers of the loss backward (fp32 log-softmax grads)
    block_backward_scratch: int  # the largest gradient buffers of one block's backward


def _attach_lora(model: nn.Module, spec: PlanSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    blocks = block_list(model)
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in target_linears(blocks[0][1], spec.lora_targets)})
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=names)
    model = get_peft_model(model, config)
    # Adapters in their training dtype (fp32: PEFT upcasts them): a 16-bit base then feeds them
    # fp32 copies of its activations, which autograd keeps. Meta tensors cannot run autocast; a
    # 16-bit run under autocast keeps less (measured on CPU: ~15 % fewer block activations), so
    # the count errs high there.
    lora_dtype = as_dtype(spec.lora_dtype)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(lora_dtype)
    return model


def trace_activations(spec: PlanSpec) -> ActivationTrace:
    """Run a two-block copy of the model forward on the meta device and count what autograd keeps."""
    model = build_meta_model(spec.model_config, spec.compute_dtype, num_layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model = _attach_lora(model, spec)
    model.train()
    # Gradients reach the first block's LoRA through the embeddings output, as the trainer arranges
    # (enable_input_require_grads) so that checkpointed blocks see an input that requires grad.
    model.enable_input_require_grads()
    inner = model.get_base_model()
    blocks = block_list(inner)

    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    param_storages |= {b.untyped_storage()._cdata for b in model.buffers()}
    region = ["before"]
    owners: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages:
            owners.setdefault(key, set()).add(region[0])
            sizes[key] = storage.nbytes()
        return tensor

    for index, (_, block) in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=index: region.__setitem__(0, f"block{i}"))
        block.register_forward_hook(lambda *_: region.__setitem__(0, "after"))

    batch, seq = spec.micro_batch, spec.seq_len
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    block_inputs: list[int] = []
    blocks[1][1].register_forward_pre_hook(
        lambda mod, args, kwargs: block_inputs.append(_first_tensor(args, kwargs).untyped_storage().nbytes()),
        with_kwargs=True,
    )
    # The trainer passes an attention mask; that also keeps the mask builders off a data-dependent
    # check (packed-sequence detection) that cannot run on meta tensors. Its packed batches have no
    # padding, which is what the SDPA mask builder would find if it could read the mask.
    from unittest import mock

    from transformers import masking_utils

    try:
        with mock.patch.object(masking_utils, "fast_all", lambda tensor: True), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    except RuntimeError as error:
        raise NotImplementedError(
            f"cannot trace {type(inner).__name__} on the meta device: {str(error).splitlines()[0]}"
        ) from None

    # Blocks are identical: a storage saved by both is shared by all (mask, ALiBi); one saved only by
    # the second block is that block's own (the first block's copy is the same size and not needed).
    counts = {"per_block": 0, "shared": 0, "before": 0, "after": 0}
    for key, regs in owners.items():
        in_blocks = regs & {"block0", "block1"}
        if len(in_blocks) == 2:
            counts["shared"] += sizes[key]
        elif in_blocks == {"block1"}:
            counts["per_block"] += sizes[key]
        elif in_blocks:
            continue
        elif "before" in regs:
            counts["before"] += sizes[key]
        else:
            counts["after"] += sizes[key]
    per_block, shared, before, after = counts["per_block"], counts["shared"], counts["before"], counts["after"]

    cfg = spec.model_config
    vocab = inner.get_output_embeddings().out_features
    compute = dtype_bytes(spec.compute_dtype)
    tokens = batch * seq
    logits = tokens * vocab * (compute + (4 if compute != 4 else 0))
    # Cross-entropy backward holds the log-softmax output's gradient and its input's gradient (fp32)
    # at once; a non-fp32 model adds the cast back to its dtype.
    loss_scratch = 2 * tokens * vocab * 4 + (tokens * vocab * compute if compute != 4 else 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = cfg.hidden_size
    ffn = getattr(cfg, "intermediate_size", None) or 4 * hidden
    # One block's backward: the attention-score gradients (two fp32 buffers around the softmax and
    # one in the model's dtype) or three of the MLP's widest gradients, whichever is larger, plus the
    # hidden-state gradients in flight. The buffer counts are what CPU runs of BLOOM shapes needed
    # (tests/plan/test_plan_measured.py); autograd does not report them.
    attention_scratch = batch * heads * seq * seq * (4 + 4 + compute)
    mlp_scratch = 3 * tokens * ffn * compute
    block_scratch = max(attention_scratch, mlp_scratch) + 2 * tokens * hidden * compute
    return ActivationTrace(
        per_block=per_block,
        block_input=block_inputs[0],
        shared=shared,
        before_blocks=before,
        after_blocks=after,
        logits=logits,
        loss_backward_scratch=loss_scratch,
        block_backward_scratch=block_scratch,
    )


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("block called without a tensor input")


# ----------------------------------------------------------------------------------------------
# The plan: device map, per-device totals, verdicts


@dataclass
class DevicePlan:
    device: Device
    units: list[str]
    quantized_weights: int = 0
    other_weights: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer_states: int = 0
    activations: int = 0
    temporary: int = 0
    overhead: int = 0

    @property
    def allocated(self) -> int:
        """What the framework allocates at the peak (compare with torch.cuda.max_memory_allocated)."""
        return (
            self.quantized_weights
            + self.other_weights
            + self.lora_params
            + self.lora_grads
            + self.optimizer_states
            + self.activations
            + self.temporary
        )

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def headroom(self) -> int:
        return self.device.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def as_dict(self) -> dict:
        return {
            "device": self.device.name,
            "capacity": self.device.capacity,
            "blocks": sum(1 for u in self.units if u.rsplit(".", 1)[-1].isdigit()),
            "units": self.units,
            "quantized_weights": self.quantized_weights,
            "other_weights": self.other_weights,
            "lora_params": self.lora_params,
            "lora_grads": self.lora_grads,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "temporary": self.temporary,
            "allocated": self.allocated,
            "overhead": self.overhead,
            "total": self.total,
            "headroom": self.headroom,
            "fits": self.fits,
        }


@dataclass
class MemoryPlan:
    spec: PlanSpec
    devices: list[DevicePlan]
    device_map: dict[str, object]
    unplaced: list[str]  # units accelerate could not put on any given device
    totals: dict[str, int]  # whole-model breakdown
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    min_devices: int | None = None  # of the given size, when planned with find_min_devices
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.unplaced and all(d.fits for d in self.devices)

    def as_dict(self) -> dict:
        cfg = self.spec.model_config
        return {
            "model": self.spec.name,
            "model_type": getattr(cfg, "model_type", None),
            "seq_len": self.spec.seq_len,
            "micro_batch": self.spec.micro_batch,
            "gradient_checkpointing": self.spec.gradient_checkpointing,
            "compute_dtype": str(as_dtype(self.spec.compute_dtype)).replace("torch.", ""),
            "quantization": self.spec.quantization,
            "lora_r": self.spec.lora_r,
            "optimizer": self.spec.optimizer,
            "fits": self.fits,
            "min_devices": self.min_devices,
            "totals": self.totals,
            "activations_with_checkpointing": self.activations_with_checkpointing,
            "activations_without_checkpointing": self.activations_without_checkpointing,
            "devices": [d.as_dict() for d in self.devices],
            "unplaced": self.unplaced,
            "device_map": {k: str(v) for k, v in self.device_map.items()},
            "overhead_figures": overhead_figures(),
            "notes": self.notes,
        }

    def table(self) -> str:
        return format_plan(self)

    def advice(self) -> str:
        """What would fit instead, for the error a trainer raises before loading weights."""
        return plan_advice(self)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    spec = plan.spec
    lines = [
        f"Memory plan: {spec.name} ({plan.totals['parameters'] / 1e9:.2f}B params), "
        f"micro_batch={spec.micro_batch}, seq_len={spec.seq_len}, "
        f"gradient_checkpointing={spec.gradient_checkpointing}, {spec.quantization} base, "
        f"LoRA r={spec.lora_r} ({plan.totals['lora_numel'] / 1e6:.1f}M params, {as_dtype(spec.lora_dtype)}), "
        f"{spec.optimizer}",
        "",
        "Whole model (GiB):",
    ]
    t = plan.totals
    for label, key in [
        ("quantized weights + scales", "quantized_weights"),
        ("unquantized (embeddings, norms, head)", "other_weights"),
        ("LoRA parameters", "lora_params"),
        ("LoRA gradients", "lora_grads"),
        (f"optimizer states ({spec.optimizer})", "optimizer_states"),
    ]:
        lines.append(f"  {label:<42} {_gib(t[key]):>9}")
    lines.append(f"  {'activations kept, gradient checkpointing':<42} {_gib(plan.activations_with_checkpointing):>9}")
    lines.append(f"  {'activations kept, no checkpointing':<42} {_gib(plan.activations_without_checkpointing):>9}")
    lines.append(f"  {'largest temporary (loss or block backward)':<42} {_gib(max(d.temporary for d in plan.devices)):>9}")
    lines += ["", "Per device (GiB):"]
    header = (
        f"  {'device':<8} {'blocks':>6} {'quant w':>8} {'other w':>8} {'LoRA':>6} {'grads':>6} {'optim':>6} "
        f"{'activ':>7} {'temp':>6} {'alloc':>7} {'ovhd':>6} {'total':>7} {'cap':>7} {'headroom':>8}  verdict"
    )
    lines.append(header)
    for d in plan.devices:
        row = d.as_dict()
        lines.append(
            f"  {d.device.name:<8} {row['blocks']:>6} {_gib(d.quantized_weights):>8} {_gib(d.other_weights):>8} "
            f"{_gib(d.lora_params):>6} {_gib(d.lora_grads):>6} {_gib(d.optimizer_states):>6} "
            f"{_gib(d.activations):>7} {_gib(d.temporary):>6} {_gib(d.allocated):>7} {_gib(d.overhead):>6} "
            f"{_gib(d.total):>7} {_gib(d.device.capacity):>7} {_gib(d.headroom):>8}  "
            f"{'fits' if d.fits else 'DOES NOT FIT'}"
        )
    if plan.unplaced:
        lines.append(f"  not placed on any device: {len(plan.unplaced)} units ({', '.join(plan.unplaced[:4])} ...)")
    lines.append("")
    lines.append(f"Verdict: {'fits' if plan.fits else 'does NOT fit'} on {len(plan.devices)} device(s).")
    if plan.min_devices is not None:
        size = plan.devices[0].device.capacity
        lines.append(f"Minimum number of {size / GiB:g} GiB devices: {plan.min_devices}")
    lines.append(overhead_figures())
    lines += plan.notes
    return "\n".join(lines)


def plan_advice(plan: MemoryPlan) -> str:
    if plan.fits:
        return "the plan fits"
    tips = []
    if plan.min_devices is not None:
        size = plan.devices[0].device.capacity / GiB
        tips.append(f"{plan.min_devices} devices of {size:g} GiB")
    if not plan.spec.gradient_checkpointing:
        tips.append("gradient checkpointing (training.gradient_checkpointing=true)")
    if plan.spec.seq_len > 128 or plan.spec.micro_batch > 1:
        tips.append("a shorter sequence or micro-batch (training.seq_len=..., training.micro_batch=...)")
    over = [f"{d.device.name} needs {_gib(d.total)} GiB of {_gib(d.device.capacity)}" for d in plan.devices if not d.fits]
    if plan.unplaced:
        static = sum(plan.totals[k] for k in ("quantized_weights", "other_weights", "lora_params", "lora_grads",
                                              "optimizer_states"))
        capacity = sum(d.device.capacity for d in plan.devices)
        over.append(
            f"{len(plan.unplaced)} modules found no device (weights, LoRA and optimizer states alone take "
            f"{_gib(static)} GiB; the {len(plan.devices)} device(s) have {_gib(capacity)} GiB)"
        )
    return "does not fit: " + "; ".join(over) + (". Would fit with: " + ", or ".join(tips) if tips else "")


class Planner:
    """Holds the meta model and the activation trace of one spec, so several device sets are cheap."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec
        self.model = build_meta_model(spec.model_config, spec.compute_dtype)
        self.costs, self.special_dtypes = _weight_costs(self.model, spec)
        self.trace = trace_activations(spec)
        blocks = block_list(self.model)
        self.block_names = [name for name, _ in blocks]
        self.head_name = self._module_name(self.model.get_output_embeddings())
        self.embed_name = self._module_name(self.model.get_input_embeddings())
        tr = self.trace
        self.per_block_activation = tr.block_input if spec.gradient_checkpointing else tr.per_block
        # Int8Linear's forward quantizes the input (int8, tokens x K) and may accumulate in int32
        # (tokens x N); its backward dequantizes weight tiles only, never the whole matrix.
        int8_scratch = 0
        if spec.quantization in ("int8", "zeroquant"):
            tokens = spec.micro_batch * spec.seq_len
            for linear in (m for _, m in target_linears(blocks[0][1], "all-linear")):
                int8_scratch = max(int8_scratch, tokens * (linear.in_features + 4 * linear.out_features))
        recompute = tr.per_block if spec.gradient_checkpointing else 0
        self.block_temporary = recompute + max(tr.block_backward_scratch, int8_scratch)

    def _module_name(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise ValueError(f"{type(module).__name__} is not a submodule of the model")

    def totals(self) -> dict[str, int]:
        keys = ["quantized_weights", "other_weights", "lora_params", "lora_grads", "optimizer_states", "lora_numel"]
        out = {k: sum(getattr(c, k) for c in self.costs.values()) for k in keys}
        out["parameters"] = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return out

    def activations(self, checkpointing: bool) -> int:
        tr = self.trace
        n = len(self.block_names)
        kept = n * (tr.block_input if checkpointing else tr.per_block)
        return kept + tr.shared + tr.before_blocks

    def device_plans(self, device_map: dict[str, object], devices: list[Device]) -> list[DevicePlan]:
        by_key = {d.accelerate_key: DevicePlan(d, []) for d in devices}
        tr = self.trace
        for unit, cost in self.costs.items():
            key = _placement(device_map, unit)
            if key not in by_key:
                continue
            plan = by_key[key]
            plan.units.append(unit)
            plan.quantized_weights += cost.quantized_weights
            plan.other_weights += cost.other_weights
            plan.lora_params += cost.lora_params
            plan.lora_grads += cost.lora_grads
            plan.optimizer_states += cost.optimizer_states
            if unit in self.block_names:
                plan.activations += self.per_block_activation
        # A tied head has no weights of its own (no unit), but accelerate still places it.
        head_key = _placement(device_map, self.head_name)
        embed_key = _placement(device_map, self.embed_name)
        for key, plan in by_key.items():
            # "activations" stay from the forward to their block's backward; "temporary" is the
            # largest of the phases that come and go: the loss (forward end, then its backward)
            # and one block's backward (recomputed first under checkpointing).
            if any(u in self.block_names for u in plan.units):
                plan.activations += tr.shared  # ALiBi / masks are moved to every device with blocks
                plan.temporary = self.block_temporary
            if key == embed_key:
                plan.activations += tr.before_blocks
            if key == head_key:
                loss_phase = tr.after_blocks + max(tr.logits, tr.loss_backward_scratch)
                plan.temporary = max(plan.temporary, loss_phase)
            if plan.units:
                dynamic = plan.activations + plan.temporary
                plan.overhead = runtime_overhead(plan.device, plan.allocated - dynamic, dynamic)
            elif plan.device.kind == "cuda":
                plan.overhead = 0  # an unused GPU costs nothing: the process never touches it
        return list(by_key.values())

    def plan(self, devices: str | Sequence[Device]) -> MemoryPlan:
        from accelerate.utils import compute_module_sizes

        devices = parse_devices(devices)
        if not devices:
            raise ValueError("no devices given")
        model = self.model
        sizes = compute_module_sizes(model, dtype=as_dtype(self.spec.compute_dtype), special_dtypes=self.special_dtypes)
        largest_block = max(sizes[name] for name in self.block_names)
        accel_weights = sizes[""]
        true_weights = sum(c.quantized_weights + c.other_weights for c in self.costs.values())
        everything = sum(c.static for c in self.costs.values()) + self.activations(self.spec.gradient_checkpointing)
        # accelerate sizes modules by their weights only; give it each device's room scaled by the
        # share of weights in everything a unit costs, then correct device by device.
        ratio = accel_weights / everything
        fixed = {d.accelerate_key: self._fixed_guess(d) for d in devices}
        budget = {d.accelerate_key: max(0, int((d.capacity - fixed[d.accelerate_key]) * ratio)) for d in devices}
        device_map: dict[str, object] = {}
        plans: list[DevicePlan] = []
        for _ in range(12):
            max_memory = dict(budget)
            # accelerate keeps room for one more block on the first device in case it must offload;
            # training never offloads, so hand that room back.
            first = devices[0].accelerate_key
            max_memory[first] += largest_block
            device_map = _quiet_device_map(
                model,
                max_memory=max_memory,
                no_split_module_classes=list(model._no_split_modules),
                dtype=as_dtype(self.spec.compute_dtype),
                special_dtypes=self.special_dtypes,
            )
            plans = self.device_plans(device_map, devices)
            over = [p for p in plans if not p.fits and p.units]
            if not over:
                break
            for p in over:
                key = p.device.accelerate_key
                # Shrink by the overshoot, and at least below what the device holds now, so that
                # it gives up a whole unit (blocks only move whole).
                held = sum(sizes[name] for name, device in device_map.items() if device == key)
                budget[key] = max(0, min(budget[key] + int(p.headroom * ratio), held - 1))
        unplaced = [u for u in self.costs if _placement(device_map, u) not in {d.accelerate_key for d in devices}]
        notes = []
        if true_weights != accel_weights:
            notes.append(
                f"weights: {_gib(true_weights)} GiB counted (quantized codes + fp32 scales); accelerate's map sized "
                f"them as {_gib(accel_weights)} GiB"
            )
        return MemoryPlan(
            spec=self.spec,
            devices=plans,
            device_map=device_map,
            unplaced=unplaced,
            totals=self.totals(),
            activations_with_checkpointing=self.activations(True),
            activations_without_checkpointing=self.activations(False),
            notes=notes,
        )

    def _fixed_guess(self, device: Device) -> int:
        base = CUDA_CONTEXT_BYTES if device.kind == "cuda" else CPU_RUNTIME_BYTES
        return base + self.block_temporary

    def find_min_devices(self, size: int, kind: str = "cuda", limit: int = 512) -> int | None:
        """Smallest number of devices of ``size`` bytes on which the plan fits (None past ``limit``)."""
        if kind != "cuda":
            return 1 if self.plan([Device("cpu", size)]).fits else None
        everything = sum(c.static for c in self.costs.values()) + self.activations(self.spec.gradient_checkpointing)
        usable = size - CUDA_CONTEXT_BYTES - self.block_temporary
        if usable <= 0:
            return None
        n = max(1, math.ceil(everything / usable))
        # Past one unit per device, more devices cannot help.
        limit = min(limit, len(self.costs) + 1)
        while n <= limit:
            if self.plan(f"{n}x{size}B").fits:
                return n
            n += 1
        return None


def _quiet_device_map(model, **kwargs):
    """accelerate's map; its warning that planned GPUs are absent from this machine is expected here."""
    import logging

    from accelerate.utils import infer_auto_device_map

    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(model, **kwargs)
    finally:
        log.setLevel(level)


def _placement(device_map: dict[str, object], unit: str):
    """The device accelerate gave ``unit`` (the map may name it, a parent, or its children)."""
    best = None
    for name, device in device_map.items():
        if name == "" or unit == name or unit.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, device)
    if best is not None:
        return best[1]
    children = {dev for name, dev in device_map.items() if name.startswith(unit + ".")}
    return children.pop() if len(children) == 1 else None


def plan_memory(config, devices: str | Sequence[Device], find_min: bool = True) -> MemoryPlan:
    """Plan a fine-tune's memory on ``devices`` ('8x24GiB', 'cpu:24GiB' or Device objects).

    ``config`` is a recipe (the trainer's config) or a :class:`PlanSpec`. Nothing is loaded: the
    model is built on the meta device from its config.
    """
    spec = config if isinstance(config, PlanSpec) else spec_from_recipe(config)
    planner = Planner(spec)
    plan = planner.plan(devices)
    if find_min:
        first = plan.devices[0].device
        plan.min_devices = planner.find_min_devices(first.capacity, first.kind)
    return plan


def model_config_from_recipe(recipe):
    """The transformers config of a recipe's model: its bundled config.json, shrunk as the recipe says."""
    from transformers import AutoConfig

    from bytetune.recipe import bundled_model_config, shrink_model_config

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
        lora_dtype=torch.float32,  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
        optimizer=name,
        optimizer_states=1 if name in ("lion8bit", "sgd8bit") else 2,
        optimizer_bits=32 if name == "adamw" else recipe.optimizer.optim_bits,
        min_8bit_size=recipe.optimizer.min_8bit_size,
        optimizer_block=recipe.optimizer.block_size,
        name=recipe.name,
    )
