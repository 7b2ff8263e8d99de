"""Pipeline parallelism (``parallel="pipeline"``): one process per GPU, stage k holding a contiguous
run of blocks, only activations crossing between GPUs (torch.distributed.pipelining).

What stage k of p holds, with m micro-batches per step:

- the int8 base, LoRA parameters, gradients and 8-bit optimizer states of its own blocks; the
  modules before the first block (embeddings) on stage 0; those after the last (final norm, head,
  loss) on stage p-1. A head tied to the embeddings needs the table on both ends: the last stage
  holds a copy (frozen, so nothing keeps the two in step). With ``pipeline_cpu_embeddings`` stage
  0 keeps the embedding table in host memory and looks the tokens up there (frozen: only the
  looked-up rows, micro_batch x seq x hidden, go to the GPU), which frees its GPU of the table;
- the micro-batches in flight: 1F1B runs at most p - k forwards on stage k before their backwards
  (``min(m, p - k)``), GPipe all m; interleaved 1F1B (V stages per rank) counts them from
  torch's own order of the rank's forwards and backwards (:func:`interleaved_order`). Each keeps its blocks' saved activations (with gradient
  checkpointing: each block's input), the stage's output until its backward (not the last
  stage) and, on stage 0, what the embeddings side keeps; GPipe's last stage also keeps the loss's
  saved tensors of each of them;
- torch.distributed.pipelining's receive buffers, allocated once for every micro-batch of a step
  (torch 2.13 ``_setup_forward_recv_info`` / ``_setup_backward_recv_info``): the input hidden
  states on every stage after the first (a micro-batch's first block reads its buffer, no copy)
  and the output gradient on every stage before the last, micro_batch x seq x hidden each;
- one block's backward at a time (under checkpointing its recomputed activations first), or on
  the last stage the loss phase if larger; the runtime overhead (CUDA context, allocator slack).

The placement: blocks split into p contiguous runs, every stage holding at least one; among the
splits on which every stage fits, those with the least FLOPs on the busiest stage (a pipeline
runs at its slowest stage's pace), and among those the one with the most headroom on its fullest
GPU. With no split that fits, the one with the most headroom (it does not fit).

Interleaved 1F1B (``pipeline_schedule="interleaved_1f1b"``, V = ``pipeline_stages_per_rank``):
p GPUs run p*V stages, GPU r the stages r, r+p, ..., r+(V-1)p (what torch's
``ScheduleInterleaved1F1B`` runs), the first on GPU 0 and the last (head, loss) on GPU p-1. The
split is the same search over p*V stages, stage k on a 1/V share of GPU k mod p (its capacity
over V plus (V-1)/V of the runtime context, so that V shares' totals add up to the GPU's with
one context; each stage counted with its own peak in flight, whose sum bounds the GPU's peak).
A GPU's plan (:meth:`StageModel.rank_plan`) then sums its stages' weights, states and receive
buffers, takes the largest temporary, and the activations at the peak of its schedule order.
The idle fraction is (p-1)/(V*m+p-1) (Narayanan et al. 2021, "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", section 2.2.2): V times less bubble, for V
times the point-to-point messages.
"""

from __future__ import annotations

from itertools import accumulate

from torch import nn

from bytetune.plan.devices import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, Device, runtime_overhead
from bytetune.plan.report import DevicePlan
from bytetune.plan.throughput import token_flops

STATIC_FIELDS = ("quantized_weights", "other_weights", "lora_params", "lora_grads", "optimizer_states")
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")


def in_flight(schedule: str, stage: int, stages: int, micro_batches: int, per_rank: int = 1) -> int:
    """Micro-batches whose forward has run on ``stage`` and whose backward has not, at most.

    interleaved_1f1b: ``stage`` is the rank, ``stages`` the ranks p, ``per_rank`` V; the count is
    over all the rank's stages together (micro-batch x stage pairs). Torch 2.13's
    ScheduleInterleaved1F1B runs W = min((V-1) * r + 2 * (p-1-rank), m * V) forwards before the
    rank's first backward (``_get_warmup_ops``, r = m // max(1, m // p) micro-batches per round),
    then one forward before each backward (``_get_1f1b_rank_ops``): W + 1 at the peak while a
    forward is left for the steady phase, else all m * V."""
    if schedule == "1f1b":
        return min(micro_batches, stages - stage)
    if schedule == "gpipe":
        return micro_batches
    if schedule == "interleaved_1f1b":
        total = micro_batches * per_rank
        warmup = _interleaved_warmup(stage, stages, per_rank, micro_batches)
        return warmup + 1 if warmup < total else total
    raise ValueError(f"parallel.pipeline.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")


def _per_round(ranks: int, micro_batches: int) -> int:
    """Micro-batches per round of ScheduleInterleaved1F1B (torch 2.13: rounds = max(1, m // p))."""
    return micro_batches // max(1, micro_batches // ranks)


def _interleaved_warmup(rank: int, ranks: int, per_rank: int, micro_batches: int) -> int:
    """Forwards before the rank's first backward (torch 2.13 ``_get_warmup_ops``, factor 2)."""
    warmup = (per_rank - 1) * _per_round(ranks, micro_batches) + 2 * (ranks - 1 - rank)
    return min(warmup, micro_batches * per_rank)


def interleaved_order(rank: int, ranks: int, per_rank: int, micro_batches: int) -> list[tuple[int, int]]:
    """The forwards and backwards of ``rank`` under torch's ScheduleInterleaved1F1B, in its order:
    (local stage 0..V-1, +1 forward / -1 backward). Re-derived from torch 2.13
    ``ScheduleInterleaved1F1B._calculate_single_rank_operations`` and ``_get_1f1b_rank_ops``:
    the warmup forwards, then forward-backward pairs, then the remaining backwards; the k-th
    forward goes to local stage (k // r) mod V, the k-th backward (counted from the first) to
    V-1 - (k // r) mod V, r the micro-batches per round."""
    total = micro_batches * per_rank
    warmup = _interleaved_warmup(rank, ranks, per_rank, micro_batches)
    r = _per_round(ranks, micro_batches)
    order = []
    for op in range(total + warmup):  # warmup forwards, total - warmup pairs, warmup backwards
        if op < total:
            order.append(((op // r) % per_rank, 1))
        if op >= warmup:
            order.append((per_rank - 1 - ((op - warmup) // r) % per_rank, -1))
    return order


def interleaved_peak(rank: int, ranks: int, per_rank: int, micro_batches: int,
                     weights: list[int], extra_last: int = 0) -> tuple[int, list[int]]:
    """(peak bytes over the rank's schedule order, each local stage's peak in flight) where a
    micro-batch in flight on local stage j keeps ``weights[j]`` bytes; on the model's last stage
    (local V-1 of the last rank) each in flight beyond the first also keeps ``extra_last``."""
    alive = [0] * per_rank
    peaks = [0] * per_rank
    peak = 0
    last = rank == ranks - 1
    for local, change in interleaved_order(rank, ranks, per_rank, micro_batches):
        alive[local] += change
        peaks[local] = max(peaks[local], alive[local])
        held = sum(a * w for a, w in zip(alive, weights))
        if last and alive[-1] > 1:
            held += (alive[-1] - 1) * extra_last
        peak = max(peak, held)
    return peak, peaks


class StageModel:
    """Per-stage memory and FLOPs of one planner's model, for any split of its blocks."""

    def __init__(self, planner):
        self.planner = planner
        p = planner
        units = p.units
        first = units.index(p.block_names[0])
        last = units.index(p.block_names[-1])
        self.before_units = units[:first]
        self.after_units = units[last + 1:]
        # Per-block static bytes as prefix sums, so any run of blocks costs O(1).
        self.prefix = {}
        for field in STATIC_FIELDS:
            per_block = [sum(getattr(p.costs[key], field) for key in p.cost_keys[b]) for b in p.block_names]
            self.prefix[field] = [0, *accumulate(per_block)]
        self.before = {f: sum(getattr(p.costs[key], f) for u in self.before_units for key in p.cost_keys[u])
                       for f in STATIC_FIELDS}
        self.after = {f: sum(getattr(p.costs[key], f) for u in self.after_units for key in p.cost_keys[u])
                      for f in STATIC_FIELDS}
        head, embedding = p.model.get_output_embeddings(), p.model.get_input_embeddings()
        # The input embedding table (frozen, no LoRA): in host memory when the spec says so.
        self.table = {"quantized_weights": 0, "other_weights": 0}
        for key in p.cost_keys[p.embed_unit]:
            self.table["quantized_weights"] += p.costs[key].quantized_weights
            self.table["other_weights"] += p.costs[key].other_weights
        self.table_bytes = sum(self.table.values())
        self.cpu_embeddings = p.spec.pipeline_cpu_embeddings
        # A tied head: its weight is counted once, with the embeddings; the last stage needs its
        # own copy when the first stage is another process or keeps the table in host memory.
        self.tied = head is not None and head.weight is embedding.weight
        # FLOPs per token of each block (its linears' weights, its LoRA, attention) and the head.
        self.block_weights = [_linear_weights(p.model.get_submodule(b)) for b in p.block_names]
        self.block_lora = [sum(p.costs[key].lora_numel for key in p.cost_keys[b]) for b in p.block_names]
        self.head_shape = tuple(head.weight.shape) if head is not None else None
        self.query_features = _query_features(p.spec.model_config)

    def flops(self, checkpointing: bool | None = None):
        """Per token: (FLOPs of each block, FLOPs of the head); see bytetune.plan.throughput."""
        spec = self.planner.spec
        ckpt = spec.gradient_checkpointing if checkpointing is None else checkpointing
        per_block = [token_flops([(w, 1)], lora, spec.seq_len, self.query_features, None, ckpt).block
                     for w, lora in zip(self.block_weights, self.block_lora)]
        head = token_flops([], 0, spec.seq_len, self.query_features, self.head_shape, ckpt).head
        return per_block, head

    def stage_plan(self, device: Device, stage: int, stages: int, start: int, count: int) -> DevicePlan:
        p, spec = self.planner, self.planner.spec
        tr = p.trace
        last = stage == stages - 1
        blocks = p.block_names[start:start + count]
        units = (self.before_units if stage == 0 else []) + blocks + (self.after_units if last else [])
        plan = DevicePlan(device, units)
        for field in STATIC_FIELDS:
            value = self.prefix[field][start + count] - self.prefix[field][start]
            value += self.before[field] if stage == 0 else 0
            if stage == 0 and self.cpu_embeddings:
                value -= self.table.get(field, 0)
            value += self.after[field] if last else 0
            if last and self.tied and (stages > 1 or self.cpu_embeddings):
                value += self.table.get(field, 0)
            setattr(plan, field, value)
        m = spec.micro_batches
        per_rank = spec.pipeline_stages_per_rank
        if spec.pipeline_schedule == "interleaved_1f1b":
            # stage k on rank k mod p as its local stage k // p: that one's peak in the rank's order
            ranks = stages // per_rank
            weights = [int(j == stage // ranks) for j in range(per_rank)]
            flying = interleaved_peak(stage % ranks, ranks, per_rank, m, weights)[1][stage // ranks]
        else:
            flying = in_flight(spec.pipeline_schedule, stage, stages, m)
        hidden = tr.block_input  # micro_batch x seq x hidden: what crosses a stage boundary
        per_micro_batch, extra_last = self.kept_per_micro_batch(stage, stages, count)
        plan.activations = flying * per_micro_batch + max(flying - 1, 0) * extra_last
        plan.buffers = ((stage > 0) + (not last)) * m * hidden if stages > 1 else 0
        plan.in_flight = flying
        plan.temporary = p.block_temporary if count else 0
        if last:
            plan.temporary = max(plan.temporary, p.loss_phase(device.kind))
        dynamic = plan.activations + plan.temporary
        plan.overhead = runtime_overhead(device, plan.allocated - dynamic, dynamic)
        return plan

    def kept_per_micro_batch(self, stage: int, stages: int, count: int) -> tuple[int, int]:
        """(bytes one micro-batch keeps on stage ``stage`` between its forward and its backward,
        what each one beyond the first adds on the last stage: its after-blocks and loss tensors;
        the first one's loss phase is the stage's temporary)."""
        p, tr = self.planner, self.planner.trace
        last = stage == stages - 1
        hidden = tr.block_input
        per_micro_batch = count * p.per_block_activation + (tr.shared if count else 0)
        if stage == 0:
            per_micro_batch += tr.before_blocks
        if not last:
            per_micro_batch += hidden  # the stage's output, kept for its backward
        if stage > 0 and count:
            per_micro_batch -= hidden  # the first block's input is the receive buffer
        return per_micro_batch, (tr.after_blocks + tr.loss.saved) if last else 0

    def rank_plan(self, device: Device, rank: int, ranks: int, runs: list[range]) -> DevicePlan:
        """Interleaved 1F1B: GPU ``rank`` of ``ranks`` holding stages rank, rank+p, ... of ``runs``
        (one block run per stage, p*V of them): its stages' weights, states and receive buffers
        summed, the largest temporary, the activations at the peak of its schedule order."""
        stages = len(runs)
        per_rank = stages // ranks
        mine = list(range(rank, stages, ranks))
        parts = [self.stage_plan(device, k, stages, runs[k].start, len(runs[k])) for k in mine]
        plan = DevicePlan(device, [unit for part in parts for unit in part.units])
        for field in (*STATIC_FIELDS, "buffers"):
            setattr(plan, field, sum(getattr(part, field) for part in parts))
        kept = [self.kept_per_micro_batch(k, stages, len(runs[k])) for k in mine]
        plan.activations, peaks = interleaved_peak(rank, ranks, per_rank, self.planner.spec.micro_batches,
                                                   [w for w, _ in kept], kept[-1][1])
        plan.in_flight = in_flight("interleaved_1f1b", rank, ranks, self.planner.spec.micro_batches, per_rank)
        plan.temporary = max(part.temporary for part in parts)
        dynamic = plan.activations + plan.temporary
        plan.overhead = runtime_overhead(device, plan.allocated - dynamic, dynamic)
        return plan

    def balanced_split(self, devices: list[Device]) -> list[range]:
        """Contiguous block runs, one per device (see the module docstring for the objective);
        interleaved 1F1B: one per stage, p*V, stage k on a 1/V share of device k mod p."""
        n, stages = len(self.planner.block_names), len(devices)
        per_rank = self.planner.spec.pipeline_stages_per_rank
        if per_rank > 1:
            context = CUDA_CONTEXT_BYTES if devices[0].kind == "cuda" else CPU_RUNTIME_BYTES
            devices = [Device(d.name, (d.capacity + (per_rank - 1) * context) // per_rank)
                       for _ in range(per_rank) for d in devices]
            stages = len(devices)
        if stages > n:
            raise ValueError(f"{stages} pipeline stages for {n} blocks: use at most {n} GPUs"
                             + (f" / {n // per_rank} GPUs at {per_rank} stages per GPU" if per_rank > 1 else ""))
        per_block, head = self.flops()
        flop_prefix = [0, *accumulate(per_block)]
        headroom: dict[tuple[int, int, int], int] = {}

        def room(k: int, start: int, count: int) -> int:
            key = (k, start, count)
            if key not in headroom:
                headroom[key] = self.stage_plan(devices[k], k, stages, start, count).headroom
            return headroom[key]

        def work(k: int, start: int, count: int) -> int:
            return flop_prefix[start + count] - flop_prefix[start] + (head if k == stages - 1 else 0)

        def best_split(limit: float | None, need_fit: bool) -> tuple[int, list[range]] | None:
            """The split maximizing the smallest headroom with every stage's work <= ``limit``
            (and every stage fitting when ``need_fit``), or None."""
            NONE = None
            # best[j]: (smallest headroom, runs) over splits of the first j blocks into k stages.
            best: list = [NONE] * (n + 1)
            best[0] = (float("inf"), [])
            for k in range(stages):
                nxt: list = [NONE] * (n + 1)
                remaining = stages - k - 1  # stages after this one, each needing a block
                for j in range(k, n - remaining):
                    if best[j] is NONE:
                        continue
                    low, runs = best[j]
                    top = n - remaining if k < stages - 1 else n
                    for end in range(j + 1, top + 1) if k < stages - 1 else (n,):
                        count = end - j
                        if limit is not None and work(k, j, count) > limit:
                            if k < stages - 1:
                                break  # longer runs only add work
                            continue
                        r = room(k, j, count)
                        if need_fit and r < 0:
                            if k < stages - 1:
                                break
                            continue
                        value = min(low, r)
                        if nxt[end] is NONE or value > nxt[end][0]:
                            nxt[end] = (value, runs + [range(j, end)])
                best = nxt
            return best[n]

        limits = sorted({work(k, s, c) for k in range(stages) for s in range(n) for c in range(1, n - s + 1)})
        if best_split(None, True) is None:
            return best_split(None, False)[1]
        low, high = 0, len(limits) - 1  # the smallest limit with a split that fits
        while low < high:
            mid = (low + high) // 2
            if best_split(limits[mid], True) is None:
                low = mid + 1
            else:
                high = mid
        return best_split(limits[low], True)[1]


def _linear_weights(block: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))


def _query_features(config) -> int:
    """Query heads x head dim: the width of QK^T and PV per token."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embed")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    head_dim = getattr(config, "head_dim", None)
    return heads * head_dim if heads and head_dim else hidden
