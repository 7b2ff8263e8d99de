"""A throughput model of a LoRA fine-tune over a frozen base: FLOPs per token, the GPUs' peak rates
and the bytes each parallel strategy moves per step over the link between GPUs.

Nothing here is measured: it is arithmetic on stated figures, printed with every estimate, so that
device_map, pipeline and FSDP2 can be compared on GPUs one does not have.

FLOPs per token (one multiply-add = 2 FLOPs), per decoder block with N linear weights (the sum of
in x out over its linears), l LoRA parameters and attention over s positions of h query features:

- forward: 2N + 2l + 4sh (QK^T and PV, over the full s x s score matrix);
- backward: 2N (the input gradient only: the base is frozen, no weight gradient) + 4l (LoRA's input
  and weight gradients) + 8sh;
- gradient checkpointing recomputes the forward once more: + 2N + 2l + 4sh.

So 6N + 8l + 16sh with checkpointing (4N + 6l + 12sh without), not the 6N of full training
(whose backward also computes the weight gradients, 2N more). The output head (V x h weights,
frozen, not checkpointed) adds 2Vh forward + 2Vh backward. Embedding lookups are free.

Time: FLOPs / (efficiency x the card's dense bf16 peak); bytes / the link bandwidth (GB/s, one
direction, every GPU sending at that rate at once).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class GpuKind:
    name: str
    bf16_tflops: float  # dense (no 2:4 sparsity) tensor-core peak, FP32 accumulate
    int8_tops: float  # dense int8 tensor-core peak
    memory: str
    nvlink_gbps: float | None  # NVLink bandwidth per GPU, one direction (GB/s); None: no all-to-all NVLink
    source: str


# From the vendors' spec sheets (dense figures: the sheets print twice these "with sparsity").
# GeForce cards run bf16 with FP32 accumulate at half their FP16-accumulate rate.
GPU_KINDS = {
    g.name: g
    for g in (
        GpuKind("rtx3090", 71.0, 284.0, "24 GB", None, "NVIDIA Ampere GA102 whitepaper (RTX 3090)"),
        GpuKind("rtx4090", 165.2, 660.6, "24 GB", None, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090)"),
        GpuKind("a10", 125.0, 250.0, "24 GB", None, "NVIDIA A10 datasheet"),
        GpuKind("a100", 312.0, 624.0, "40/80 GB", 300.0, "NVIDIA A100 datasheet (SXM, NVLink 600 GB/s)"),
        GpuKind("l40", 181.05, 362.0, "48 GB", None, "NVIDIA L40 datasheet"),
        GpuKind("h100", 989.4, 1978.9, "80 GB", 450.0, "NVIDIA H100 datasheet (SXM, NVLink 900 GB/s)"),
        GpuKind("h100-pcie", 756.0, 1513.0, "80 GB", None, "NVIDIA H100 datasheet (PCIe)"),
    )
}
DEFAULT_GPU = "rtx4090"
# The fraction of the bf16 peak the GEMMs reach. The int8 peak is listed, not used: LLM.int8()'s
# per-token quantization and 16-bit outlier columns make its GEMMs no faster than bf16 in practice
# (bitsandbytes' own table), and the input-gradient GEMMs of the backward run in bf16.
DEFAULT_EFFICIENCY = 0.4
# Effective one-direction bandwidth of a link (GB/s); PCIe 4.0 x16 is 31.5 GB/s raw.
LINKS = {"pcie4": 25.0, "pcie5": 50.0}
DEFAULT_LINK = "pcie4"


def gpu_kind(name: str) -> GpuKind:
    kind = GPU_KINDS.get(name.lower())
    if kind is None:
        raise ValueError(f"gpu={name!r} is not a GPU kind the planner knows: use one of {', '.join(GPU_KINDS)}")
    return kind


def link_bandwidth(link: str, gpu: GpuKind) -> float:
    """Bytes per second for ``link``: 'pcie4', 'pcie5', 'nvlink' (the card's) or a figure '40GB/s'."""
    text = link.strip().lower()
    if text in LINKS:
        return LINKS[text] * GB
    if text == "nvlink":
        if gpu.nvlink_gbps is None:
            raise ValueError(f"link=nvlink: {gpu.name} has no NVLink between all its GPUs; use link=pcie4 "
                             "(or give the bandwidth, e.g. link=50GB/s)")
        return gpu.nvlink_gbps * GB
    if text.endswith("gb/s"):
        try:
            value = float(text[:-4])
        except ValueError:
            value = 0.0
        if value > 0:
            return value * GB
    raise ValueError(f"link={link!r}: use pcie4, pcie5, nvlink or a bandwidth such as 25GB/s")


@dataclass
class TokenFlops:
    """FLOPs per token of one block and of the head (see the module docstring)."""

    block_weights: int  # N: the block's linear weights
    block_lora: int  # l: its LoRA parameters
    attention: int  # 4 s h: one forward pass of QK^T and PV per token
    head_weights: int  # V h
    checkpointing: bool

    @property
    def block(self) -> int:
        forward = 2 * self.block_weights + 2 * self.block_lora + self.attention
        backward = 2 * self.block_weights + 4 * self.block_lora + 2 * self.attention
        return forward + backward + (forward if self.checkpointing else 0)

    @property
    def head(self) -> int:
        return 4 * self.head_weights


def token_flops(block_linears: list[tuple[int, int]], lora_per_block: int, seq_len: int, query_features: int,
                head_shape: tuple[int, int] | None, checkpointing: bool) -> TokenFlops:
    """From the block's linears ((in, out) pairs), its LoRA parameters, the sequence length, the
    attention's query features (heads x head dim) and the head's (vocab, hidden)."""
    return TokenFlops(
        block_weights=sum(i * o for i, o in block_linears),
        block_lora=lora_per_block,
        attention=4 * seq_len * query_features,
        head_weights=head_shape[0] * head_shape[1] if head_shape else 0,
        checkpointing=checkpointing,
    )


@dataclass
class StrategySpeed:
    """One strategy's modelled step on the given GPUs."""

    strategy: str  # "device_map", "pipeline", "fsdp2"
    fits: bool  # the planner's memory verdict for it on the same GPUs
    min_headroom: int  # bytes, the smallest over the GPUs
    gpus_used: int
    step_tokens: int
    compute_s: float  # on the step's critical path
    comm_s: float  # on the critical path (FSDP2: all of it, overlapped with compute)
    step_s: float
    idle: float  # fraction of GPU-time spent waiting
    comm_bytes: int  # bytes one GPU receives per step
    detail: str

    @property
    def tokens_per_s(self) -> float:
        return self.step_tokens / self.step_s if self.step_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy, "fits": self.fits, "min_headroom": self.min_headroom,
            "gpus_used": self.gpus_used, "step_tokens": self.step_tokens, "compute_s": self.compute_s,
            "comm_s": self.comm_s, "step_s": self.step_s, "idle": self.idle, "comm_bytes": self.comm_bytes,
            "tokens_per_s": self.tokens_per_s, "detail": self.detail,
        }


@dataclass
class ThroughputModel:
    gpu: GpuKind
    link: str
    bandwidth: float  # bytes/s
    efficiency: float
    flops: TokenFlops
    strategies: list[StrategySpeed]

    @property
    def rate(self) -> float:
        """FLOP/s one GPU sustains."""
        return self.efficiency * self.gpu.bf16_tflops * 1e12

    def speed(self, strategy: str) -> StrategySpeed:
        return next(s for s in self.strategies if s.strategy == strategy)

    def as_dict(self) -> dict:
        return {
            "gpu": self.gpu.name, "bf16_tflops": self.gpu.bf16_tflops, "int8_tops": self.gpu.int8_tops,
            "gpu_source": self.gpu.source, "efficiency": self.efficiency, "link": self.link,
            "bandwidth_bytes_per_s": self.bandwidth,
            "flops_per_token": {"block": self.flops.block, "head": self.flops.head,
                                "block_weights": self.flops.block_weights, "block_lora": self.flops.block_lora,
                                "attention_forward": self.flops.attention, "head_weights": self.flops.head_weights,
                                "checkpointing": self.flops.checkpointing},
            "strategies": [s.as_dict() for s in self.strategies],
        }

    def table(self) -> str:
        base = self.speed("device_map").tokens_per_s if any(s.strategy == "device_map" for s in self.strategies) else 0
        lines = [
            f"Modelled throughput on {self.gpu.name} ({self.gpu.bf16_tflops:g} bf16 TFLOP/s dense peak x "
            f"{self.efficiency:g} = {self.rate / 1e12:.1f} TFLOP/s per GPU; int8 {self.gpu.int8_tops:g} TOPS not "
            f"assumed), link {self.link} at {self.bandwidth / GB:g} GB/s per direction:",
            f"  FLOPs per token: {self.flops.block / 1e9:.2f} G per block, {self.flops.head / 1e9:.2f} G head "
            f"({'6N + 8l + 16sh' if self.flops.checkpointing else '4N + 6l + 12sh'} per block, frozen base"
            f"{', checkpointing' if self.flops.checkpointing else ''}; 4Vh head)",
            f"  {'strategy':<11} {'memory':<12} {'GPUs':>4} {'tokens/step':>11} {'compute s':>9} {'comm s':>8} "
            f"{'step s':>8} {'idle':>5} {'tokens/s':>9} {'vs device_map':>13}",
        ]
        for s in self.strategies:
            memory = f"fits {s.min_headroom / 2**30:+.2f}" if s.fits else "DOES NOT FIT"
            ratio = f"{s.tokens_per_s / base:.2f}x" if base else "-"
            lines.append(
                f"  {s.strategy:<11} {memory:<12} {s.gpus_used:>4} {s.step_tokens:>11} {s.compute_s:>9.2f} "
                f"{s.comm_s:>8.2f} {s.step_s:>8.2f} {s.idle:>5.0%} {s.tokens_per_s:>9.1f} {ratio:>13}"
            )
        lines += [f"  {s.strategy}: {s.detail}" for s in self.strategies]
        return "\n".join(lines)


def device_map_speed(flops_per_token: float, tokens_per_micro_batch: int, micro_batches: int, boundaries: int,
                     boundary_bytes: int, rate: float, bandwidth: float) -> tuple[float, float]:
    """(compute, comm) seconds of one step of a device map: one GPU works at a time; each
    micro-batch's hidden states cross every boundary forward and their gradients backward."""
    compute = micro_batches * tokens_per_micro_batch * flops_per_token / rate
    comm = micro_batches * boundaries * 2 * boundary_bytes / bandwidth
    return compute, comm


def pipeline_step(stage_compute: list[float], stage_comm: list[float],
                  micro_batches: int) -> tuple[float, float, float]:
    """(step, critical-path compute, critical-path comm) seconds of a 1F1B / GPipe step from the
    per-micro-batch time of each stage: the first micro-batch passes every stage, the other m - 1
    follow at the pace of the slowest (for equal stages: (m + p - 1) x one stage's time)."""
    times = [c + t for c, t in zip(stage_compute, stage_comm)]
    slowest = max(range(len(times)), key=times.__getitem__)
    compute = sum(stage_compute) + (micro_batches - 1) * stage_compute[slowest]
    comm = sum(stage_comm) + (micro_batches - 1) * stage_comm[slowest]
    return compute + comm, compute, comm


def interleaved_pipeline_step(rank_compute: list[float], rank_comm: list[float], micro_batches: int,
                              per_rank: int) -> tuple[float, float, float]:
    """(step, critical-path compute, critical-path comm) seconds of an interleaved 1F1B step from
    each device's time per micro-batch over its V stages: m micro-batches at the slowest device's
    pace plus a bubble of (p-1) of its chunks of 1/V (Narayanan et al. 2021, section 2.2.2: the
    bubble shrinks V-fold), so for equal devices idle (p-1)/(V*m+p-1)."""
    times = [c + t for c, t in zip(rank_compute, rank_comm)]
    slowest = max(range(len(times)), key=times.__getitem__)
    factor = micro_batches + (len(times) - 1) / per_rank
    compute, comm = factor * rank_compute[slowest], factor * rank_comm[slowest]
    return compute + comm, compute, comm


def idle_fraction(stages: int, micro_batches: int, per_rank: int = 1) -> float:
    """The pipeline bubble of GPipe / 1F1B with equal stages: (p - 1) / (m + p - 1); interleaved
    1F1B with ``per_rank`` = V stages on each of the p devices: (p - 1) / (V*m + p - 1)."""
    return (stages - 1) / (per_rank * micro_batches + stages - 1)
