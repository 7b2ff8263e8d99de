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
  (``min(m, p - k)``), GPipe all m. Each keeps its blocks' saved activations (with gradient
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
"""

from __future__ import annotations

from itertools import accumulate

from torch import nn

from bytetune.plan.devices import Device, runtime_overhead
from bytetune.plan.report import DevicePlan
from bytetune.plan.throughput import token_flops

STATIC_FIELDS = ("quantized_weights", "other_weights", "lora_params", "lora_grads", "optimizer_states")
SCHEDULES = ("1f1b", "gpipe")


def in_flight(schedule: str, stage: int, stages: int, micro_batches: int) -> int:
    """Micro-batches whose forward has run on ``stage`` and whose backward has not, at most."""
    if schedule == "1f1b":
        return min(micro_batches, stages - stage)
    if schedule == "gpipe":
        return micro_batches
    raise ValueError(f"parallel.pipeline.schedule={schedule!r}: the planner models 1f1b and gpipe "
                     "(interleaved_1f1b, several stages per GPU, is not modelled: plan it as 1f1b)")


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
        flying = in_flight(spec.pipeline_schedule, stage, stages, m)
        hidden = tr.block_input  # micro_batch x seq x hidden: what crosses a stage boundary
        per_micro_batch = count * p.per_block_activation + (tr.shared if count else 0)
        if stage == 0:
            per_micro_batch += tr.before_blocks
        if not last:
            per_micro_batch += hidden  # the stage's output, kept for its backward
        if stage > 0 and count:
            per_micro_batch -= hidden  # the first block's input is the receive buffer
        plan.activations = flying * per_micro_batch
        if last:
            # Beyond the one whose loss phase is the temporary: the others' after-blocks and loss tensors.
            plan.activations += (flying - 1) * (tr.after_blocks + tr.loss.saved)
        plan.buffers = ((stage > 0) + (not last)) * m * hidden if stages > 1 else 0
        plan.in_flight = flying
        plan.temporary = p.block_temporary if count else 0
        if last:
            plan.temporary = max(plan.temporary, p.loss_phase(device.kind))
        dynamic = plan.activations + plan.temporary
        plan.overhead = runtime_overhead(device, plan.allocated - dynamic, dynamic)
        return plan

    def balanced_split(self, devices: list[Device]) -> list[range]:
        """Contiguous block runs, one per device (see the module docstring for the objective)."""
        n, stages = len(self.planner.block_names), len(devices)
        if stages > n:
            raise ValueError(f"{stages} pipeline stages for {n} blocks: use at most {n} GPUs")
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
