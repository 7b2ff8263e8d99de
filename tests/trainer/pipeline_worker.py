"""One rank of the pipeline tests (started N times by torchrun from test_pipeline.py).

argv: OUT_JSON CASES_JSON. CASES_JSON is a list of cases, run one after another by the same
processes (starting processes is what costs on 2 cores): {"name", "recipe", "overrides",
"resume_check"} or, for the non-finite guard, {"name", "recipe", "overrides", "poisoned_step"}. Each case trains straight through, then (with resume_check) again stopped after
step 2 and resumed by a new PipelineTrainer from its checkpoint. Rank 0 writes per case what the
test compares: losses, eval loss, the whole adapter, and per rank the blocks, parameter counts and
checkpoint bytes read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bytetune.trainer.pipeline import PipelineTrainer

torch.set_num_threads(1)


def run(recipe: str, overrides: dict, stop_after_step: int | None = None) -> PipelineTrainer:
    trainer = PipelineTrainer.from_recipe(recipe, **overrides)
    trainer.train(stop_after_step=stop_after_step)
    return trainer


def as_lists(state: dict | None) -> dict | None:
    return None if state is None else {k: v.tolist() for k, v in state.items()}


def rank_facts(trainer: PipelineTrainer) -> dict:
    # every stage of this rank (one, or stages_per_rank under interleaved_1f1b)
    params = [p for model in trainer.models for p in model.parameters()]
    buffers = [b for model in trainer.models for b in model.buffers()]
    return {
        "blocks": [[r.start, r.stop] for r in trainer.rank_ranges],
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "frozen": sum(p.numel() for p in params if not p.requires_grad),
        "int8": sum(p.numel() for p in params if p.dtype == torch.int8),
        # every byte this process allocated for the model's tensors
        "tensor_bytes": sum(t.numel() * t.element_size() for t in [*params, *buffers]),
        "bytes_read": trainer.bytes_read,
        # indices of the blocks whose parameters this process holds, read from their names
        "block_indices": sorted({int(m.group(1)) for model in trainer.models for n, _ in model.named_parameters()
                                 if (m := re.search(r"\.(?:h|layers)\.(\d+)\.", n))}),
    }


def poisoned_run(recipe: str, overrides: dict, poisoned_step: int) -> dict:
    """Three steps by hand; the last stage's loss of step ``poisoned_step`` (1-based) is NaN. Per
    rank: whether each step changed this stage's adapters, and the non-finite step count."""
    trainer = PipelineTrainer.from_recipe(recipe, **overrides)
    if trainer.last:
        original = trainer.stage_module.summed_loss

        def summed_loss(hidden, labels, fused):
            value = original(hidden, labels, fused)
            return value * float("nan") if trainer.step + 1 == poisoned_step else value

        trainer.stage_module.summed_loss = summed_loss
    trainer.model.train()
    changed, losses = [], []
    for _ in range(3):
        before = trainer.stage_state()
        loss_value, _ = trainer._train_step()
        trainer.step += 1
        losses.append(loss_value)
        changed.append(any(not torch.equal(before[k], v) for k, v in trainer.stage_state().items()))
    return {"changed": changed, "nonfinite_steps": trainer.nonfinite_steps, "losses": losses}


def main() -> None:
    out, cases = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    results = {}
    for case in cases:
        overrides = dict(case["overrides"])
        if "poisoned_step" in case:
            facts = [None] * dist.get_world_size()
            dist.all_gather_object(facts, poisoned_run(case["recipe"], overrides, case["poisoned_step"]))
            results[case["name"]] = {"ranks": facts}
            continue
        straight = run(case["recipe"], {**overrides, "output_dir": str(Path(overrides["output_dir"]) / "straight")})
        facts = [None] * straight.ranks
        dist.all_gather_object(facts, rank_facts(straight))
        result = {
            "losses": [h["loss"] for h in straight.history],
            "eval_loss": straight.eval_history[-1]["eval_loss"],
            "adapter": as_lists(straight.full_adapter_state()),
            "ranks": facts,
            "adapter_dir": str(straight.output_dir / "adapter"),
        }
        del straight
        if case.get("resume_check"):
            resumed_dir = str(Path(overrides["output_dir"]) / "resumed")
            first = run(case["recipe"], {**overrides, "output_dir": resumed_dir}, stop_after_step=2)
            assert first.step == 2
            del first
            resumed = run(case["recipe"], {**overrides, "output_dir": resumed_dir, "checkpoint.resume": "true"})
            result["resumed_losses"] = [h["loss"] for h in resumed.history]
            result["resumed_adapter"] = as_lists(resumed.full_adapter_state())
            del resumed
        results[case["name"]] = result
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main()
