"""Pipeline-parallel training: 2 and 4 CPU processes over gloo against one process.

Each multi-process test starts the ranks once with torchrun (tests/trainer/pipeline_worker.py)
and runs several cases in them. The models are a tiny BLOOM and a tiny Llama (the bundled SmolLM2
config shrunk) with 4 blocks each, saved as float safetensors checkpoints: each stage builds the
model on the meta device and reads only its own tensors; the one-process reference loads the
checkpoint whole through transformers (quantized while loading). The micro-batches of a pipeline
step are the reference's accumulation steps (same rows), dropout is off, the 8-bit states are on
(min_8bit_size 64): a stage holds whole tensors, so its states quantize exactly as one process's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # an accelerate dependency
import pytest
import torch

from bytetune.recipe import RecipeError, load_recipe
from bytetune.trainer.checkpoint import list_checkpoints
from bytetune.trainer.pipeline import PipelineTrainer, default_ranges, split_blocks
from bytetune.trainer.trainer import Trainer

from tests.tolerances import assert_adapters_agree

from .helpers import REPO, free_port, as_cli, start_until_checkpoint_write, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
COMMON = {"training.max_steps": 4, "checkpoint.every_steps": 2, "lora.dropout": 0.0, "optimizer.min_8bit_size": 64,
          "optimizer.block_size": 64, "eval.at_start": False, "eval.max_batches": 2, "model.from_config": False}
BLOOM = {"model.shrink.num_layers": 4}
LLAMA = {"model.config_file": "smollm2-135m", "model.name_or_path": "tiny-llama", "model.shrink.num_layers": 4,
         "model.shrink.hidden_size": 64, "model.shrink.num_heads": 4, "model.shrink.vocab_size": 384}
BLOCK_INDEX = r"\.(?:h|layers)\.(\d+)\."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Float checkpoints of the two 4-block models (what a stage reads its tensors from)."""
    from bytetune.loaders.models import load_base_model

    root = tmp_path_factory.mktemp("pipeline_models")
    made = {}
    for name, shrink in (("bloom", BLOOM), ("llama", LLAMA)):
        base, tokenizer = load_base_model(load_recipe("tiny_lora8", tiny_overrides(root, **shrink)))
        base.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        made[name] = root / name
    return made


def overrides_for(tmp_path: Path, checkpoint: Path, micro_batches: int, **extra) -> dict:
    return tiny_overrides(tmp_path, **COMMON, **{"model.name_or_path": str(checkpoint),
                                                 "training.grad_accum_steps": micro_batches}, **extra)


_SINGLE: dict[str, dict] = {}


def single_process(tmp_path: Path, overrides: dict, recipe: str = "tiny_lora8") -> dict:
    """The same recipe in this process (no pipeline): losses, eval loss, adapters, parameters."""
    key = json.dumps({k: v for k, v in {**overrides, "recipe": recipe}.items() if k not in ("output_dir", "data.cache_dir")},
                     sort_keys=True)
    if key not in _SINGLE:
        trainer = Trainer.from_recipe(recipe, **{**overrides, "parallel.strategy": "none",
                                                       "output_dir": str(tmp_path / f"single{len(_SINGLE)}")})
        trainer.train()
        _SINGLE[key] = {
            "losses": [h["loss"] for h in trainer.history],
            "eval_loss": trainer.eval_history[-1]["eval_loss"],
            "adapter": {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad},
            "params": [(n, p.numel(), p.requires_grad, p.dtype) for n, p in trainer.unwrapped.named_parameters()],
            "tensor_bytes": sum(t.numel() * t.element_size()
                                for t in [*trainer.unwrapped.parameters(), *trainer.unwrapped.buffers()]),
            "table_bytes": (lambda w: w.numel() * w.element_size())(trainer.unwrapped.get_input_embeddings().weight),
        }
    return _SINGLE[key]


def run_pipeline(tmp_path: Path, stages: int, cases: list[dict], port: int) -> dict:
    out, spec = tmp_path / "pipeline.json", tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(stages), "--master_port", str(port),
               str(REPO / "tests" / "trainer" / "pipeline_worker.py"), str(out), str(spec)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def case(name: str, overrides: dict, schedule: str, resume_check: bool = False) -> dict:
    return {"name": name, "recipe": "tiny_lora8", "resume_check": resume_check,
            "overrides": {**overrides, "parallel.strategy": "pipeline", "parallel.pipeline.schedule": schedule,
                          "output_dir": str(Path(overrides["output_dir"]) / name)}}




def check_against_single_process(result: dict, single: dict, stages: int, checkpoint_bytes: int, overrides: dict,
                                  per_rank: int = 1) -> None:
    """``stages``: the processes; ``per_rank``: the stages each runs (interleaved_1f1b: rank r
    the stages r, r+p, ...)."""
    import re

    from bytetune.plan import pipeline_stages, spec_from_recipe

    assert len(result["losses"]) == len(single["losses"]) == 4
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert result["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert result["adapter"].keys() == single["adapter"].keys()
    assert_adapters_agree({name: torch.tensor(weight) for name, weight in result["adapter"].items()}, single["adapter"])

    # each rank holds its own blocks only: the planner's split, their adapters and int8 codes
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(overrides["model.name_or_path"])  # the checkpoint's model
    ranges = pipeline_stages(spec_from_recipe(load_recipe("tiny_lora8", overrides), model_config), stages * per_rank)
    assert [f["blocks"] for f in result["ranks"]] == [[[r.start, r.stop] for r in ranges[rank::stages]]
                                                      for rank in range(stages)]
    for rank, facts in enumerate(result["ranks"]):
        blocks = {index for r in ranges[rank::stages] for index in r}
        assert facts["block_indices"] == sorted(blocks)
        in_stage = [(numel, trainable, dtype) for name, numel, trainable, dtype in single["params"]
                    if (m := re.search(BLOCK_INDEX, name)) and int(m.group(1)) in blocks]
        assert facts["trainable"] == sum(numel for numel, trainable, _ in in_stage if trainable)
        assert facts["int8"] == sum(numel for numel, _, dtype in in_stage if dtype == torch.int8)
        # what the process allocated for tensors and read from the checkpoint: its share of the
        # blocks plus at most one vocabulary table (the first stage's embeddings, the last's head)
        table = single["table_bytes"]
        assert facts["tensor_bytes"] <= single["tensor_bytes"] / stages + table, (rank, facts, single["tensor_bytes"])
        assert 0 < facts["bytes_read"] <= checkpoint_bytes / stages + table, (rank, facts, checkpoint_bytes)
    # and together they read the whole checkpoint (the tied table twice: embeddings and head)
    assert sum(f["bytes_read"] for f in result["ranks"]) >= checkpoint_bytes - 4096


def shrunk_pipeline_recipe(tmp_path: Path) -> dict:
    from .test_recipes_shrunk import SHRINK

    # dropout off: each stage draws its own masks, the one-process reference compares exactly;
    # 2 micro-batches of 2 rows per step (the reference accumulates 2 steps of 2 rows); fp32: the
    # ranks run the other cases in fp32 and accelerate's state cannot change precision under torchrun
    return tiny_overrides(tmp_path / "pp", **{**SHRINK, "lora.dropout": 0.0, "training.grad_accum_steps": 2,
                                              "parallel.pipeline.micro_batches": 2, "eval.at_start": False,
                                              "training.precision": "fp32"})


def safetensors_bytes(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.slow
def test_two_stages_bloom_1f1b_and_llama_gpipe_equal_one_process_resume_bitwise_skip_together_save_plain_peft(tmp_path, checkpoints):
    bloom = overrides_for(tmp_path, checkpoints["bloom"], micro_batches=2)
    llama = overrides_for(tmp_path, checkpoints["llama"], micro_batches=2)
    poisoned = {**case("bloom_poisoned", {**bloom, "schedule.warmup_steps": 0}, "1f1b"), "poisoned_step": 2}
    # the shipped pipeline recipe, shrunk as test_recipes_shrunk.py shrinks the others (int8
    # embeddings, the table in host memory, the planner's split), through 2 real stages
    pp = shrunk_pipeline_recipe(tmp_path)
    pp_case = {**case("bloom_lora8_pp", pp, "1f1b"), "recipe": "bloom_lora8_pp"}
    # interleaved 1F1B: 2 ranks x 2 stages of one block each (rank 0 blocks 0 and 2, rank 1 blocks 1 and 3)
    interleaved = case("llama_interleaved", llama, "interleaved_1f1b", resume_check=True)
    results = run_pipeline(tmp_path, 2, [case("bloom_1f1b", bloom, "1f1b", resume_check=True),
                                         case("llama_gpipe", llama, "gpipe"), poisoned, pp_case, interleaved],
                           port=free_port())
    shipped = results["bloom_lora8_pp"]
    single = single_process(tmp_path, pp, recipe="bloom_lora8_pp")
    assert len(shipped["losses"]) == 2 and all(math.isfinite(loss) for loss in shipped["losses"])
    torch.testing.assert_close(torch.tensor(shipped["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert shipped["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert shipped["adapter"].keys() == single["adapter"].keys()
    assert [f["blocks"] for f in shipped["ranks"]] == [[[0, 1]], [[1, 2]]]
    # a NaN loss on the last stage at step 2: every stage skips that update, and only that one
    for facts in results["bloom_poisoned"]["ranks"]:
        assert facts["changed"] == [True, False, True] and facts["nonfinite_steps"] == 1, facts
        assert math.isnan(facts["losses"][1]) and math.isfinite(facts["losses"][2]), facts
    for name, overrides, model in (("bloom_1f1b", bloom, "bloom"), ("llama_gpipe", llama, "llama")):
        check_against_single_process(results[name], single_process(tmp_path, overrides), 2,
                                     safetensors_bytes(checkpoints[model]), overrides)
    check_against_single_process(results["llama_interleaved"], single_process(tmp_path, llama), 2,
                                 safetensors_bytes(checkpoints["llama"]), interleaved["overrides"], per_rank=2)
    assert [f["blocks"] for f in results["llama_interleaved"]["ranks"]] == [[[0, 1], [2, 3]], [[1, 2], [3, 4]]]
    # stopped after the step-2 checkpoint and resumed by new trainers: bit for bit
    for name in ("bloom_1f1b", "llama_interleaved"):
        resumed = results[name]
        assert resumed["resumed_losses"] == resumed["losses"], name
        assert resumed["resumed_adapter"] == resumed["adapter"], name

    # the saved adapter is one plain PEFT adapter: it loads onto the float base in one process
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    loaded = PeftModel.from_pretrained(base, results["llama_gpipe"]["adapter_dir"])
    weights = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert weights.keys() == results["llama_gpipe"]["adapter"].keys()
    for name, weight in weights.items():
        assert torch.equal(weight.detach(), torch.tensor(results["llama_gpipe"]["adapter"][name])), name


@pytest.mark.slow
def test_four_stages_bloom_gpipe_and_llama_1f1b_equal_one_process(tmp_path, checkpoints):
    bloom = overrides_for(tmp_path, checkpoints["bloom"], micro_batches=4)
    llama = overrides_for(tmp_path, checkpoints["llama"], micro_batches=4)
    results = run_pipeline(tmp_path, 4, [case("bloom_gpipe", bloom, "gpipe"), case("llama_1f1b", llama, "1f1b")],
                           port=free_port())
    check_against_single_process(results["bloom_gpipe"], single_process(tmp_path, bloom), 4,
                                 safetensors_bytes(checkpoints["bloom"]), bloom)
    check_against_single_process(results["llama_1f1b"], single_process(tmp_path, llama), 4,
                                 safetensors_bytes(checkpoints["llama"]), llama)


def kill_launcher_and_ranks(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank."""
    launcher = psutil.Process(process.pid)
    victims = [launcher, *launcher.children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=60)
    process.wait()


@pytest.mark.slow
def test_pipeline_killed_during_a_checkpoint_resumes_through_train_py(tmp_path, checkpoints):
    overrides = overrides_for(tmp_path, checkpoints["bloom"], micro_batches=2)
    run_dir = Path(overrides["output_dir"])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "train.py"), "recipe=tiny_lora8", "parallel.strategy=pipeline", *as_cli(overrides)]
    process, _ = start_until_checkpoint_write(command, run_dir, ENV, kill=kill_launcher_and_ranks)
    kill_launcher_and_ranks(process)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]

    resumed = subprocess.run([*command, "checkpoint.resume=true"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parallel"] == "pipeline" and summary["steps"] == 4 and summary["steps_this_session"] == 2
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert {p.name for p in (run_dir / "checkpoints" / "step-00000004").glob("stage*.pt")} == {"stage0.pt", "stage1.pt"}
    # the run owns its folder the way a one-process run does: run.json and every checkpoint carry
    # the recipe's hash (so a resume with another recipe is refused)
    owner = json.loads((run_dir / "run.json").read_text())["recipe_hash"]
    for checkpoint in list_checkpoints(run_dir):
        assert json.loads((checkpoint / "trainer_state.json").read_text())["recipe"]["hash"] == owner
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    # the killed-and-resumed run ends where one uninterrupted process ends
    from safetensors.torch import load_file

    single = single_process(tmp_path, overrides)
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    mine = {k.replace(".default", ""): v for k, v in single["adapter"].items()}
    assert_adapters_agree(saved, mine)


# ------------------------------------------------------------------------- no processes needed
@pytest.mark.parametrize("blocks,stages,sizes", [(4, 2, [2, 2]), (5, 2, [3, 2]), (70, 8, [8, 9, 9, 9, 9, 9, 9, 8]),
                                                 (3, 3, [1, 1, 1]), (6, 4, [1, 2, 2, 1])])
def test_split_blocks_is_contiguous_and_as_even_as_it_can_be(blocks, stages, sizes):
    ranges = split_blocks(blocks, stages)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(blocks))


def test_split_blocks_refuses_more_stages_than_blocks():
    with pytest.raises(RecipeError, match="5 pipeline stages for 4 decoder blocks"):
        split_blocks(4, 5)


@pytest.mark.parametrize("override,message", [
    ({"model.device_map": "auto"}, "model.device_map='auto' splits one model inside one process"),
    # tiny_lora8's model has 2 blocks
    ({"parallel.pipeline.schedule": "interleaved_1f1b"},
     r"2 processes x parallel.pipeline.stages_per_rank=2 = 4 pipeline stages for 2 decoder blocks"),
    ({"parallel.pipeline.stages_per_rank": 2}, "stages_per_rank=2 needs parallel.pipeline.schedule=interleaved_1f1b"),
    ({"parallel.pipeline.schedule": "interleaved_1f1b", "parallel.pipeline.stages_per_rank": 1},
     "interleaving needs 2 or more stages per process"),
    ({"parallel.pipeline.schedule": "interleaved_1f1b", "model.shrink.num_layers": 8, "training.grad_accum_steps": 5},
     r"micro_batches=5 over 2 processes: interleaved_1f1b .* multiple of max\(1, micro_batches // processes\) = 2; "
     r"use a multiple of 2 \(4 or 6\)"),
    ({"training.precision": "fp16"}, "fp16 needs a gradient scaler"),
    ({"export.merged": True}, "export.merged is not available under the pipeline"),
    ({"training.grad_accum_steps": 1}, "micro_batches=1 is fewer than the 2 stages"),
    ({"model.from_config": False, "model.name_or_path": "pypi:bytetune"}, "reads only its own tensors from a local"),
])
def test_what_the_pipeline_cannot_do_fails_before_loading(tmp_path, monkeypatch, override, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing loads, so no group is needed
    with pytest.raises(RecipeError, match=message):
        PipelineTrainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"parallel.strategy": "pipeline", **override}))


def test_the_plain_trainer_refuses_a_pipeline_over_several_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="build the trainer with bytetune.trainer.pipeline.PipelineTrainer"):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"parallel.strategy": "pipeline"}))


def test_one_process_asked_for_a_pipeline_trains_unsplit_with_a_warning(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"parallel.strategy": "pipeline", "training.max_steps": 1,
                                            "schedule.warmup_steps": 0, "eval.at_start": False})
    with pytest.warns(UserWarning, match="only process: one stage"):
        trainer = Trainer.from_recipe("tiny_lora8", **overrides)
    assert trainer.train()["parallel"] == "none"


def test_a_pipeline_run_into_a_used_output_dir_is_refused_before_any_process_group(tmp_path, monkeypatch):
    from bytetune.trainer import checkpoint as ckpt

    monkeypatch.setenv("WORLD_SIZE", "2")  # from_config's checks run before the group is needed
    overrides = tiny_overrides(tmp_path, **{"parallel.strategy": "pipeline"})
    other = load_recipe("tiny_lora8", {**overrides, "lora.r": 3})
    run_dir = Path(overrides["output_dir"])
    run_dir.mkdir(parents=True)
    ckpt.write_run_file(run_dir, ckpt.recipe_identity(other))
    with pytest.raises(ckpt.CheckpointError, match=f"output_dir {run_dir} holds another run .*checkpoint.overwrite=true"):
        PipelineTrainer.from_recipe("tiny_lora8", **overrides)
    # with checkpoint.overwrite=true the checks pass and it goes on to need the process group
    monkeypatch.delenv("WORLD_SIZE")  # (accelerate would look for torchrun's other variables)
    with pytest.raises(RecipeError, match="needs a process group"):
        PipelineTrainer.from_recipe("tiny_lora8", **{**overrides, "checkpoint.overwrite": True})
    assert (run_dir / "run.json").is_file()  # nothing removed before the run can start


def test_default_stage_ranges_are_the_planners_for_bloom_lora8_pp():
    from bytetune.plan import pipeline_stages
    from bytetune.plan.spec import model_config_from_recipe

    cfg = load_recipe("bloom_lora8_pp")
    config = model_config_from_recipe(cfg)
    ranges = default_ranges(cfg, config, config.n_layer, 8)
    assert ranges == pipeline_stages(cfg, 8)
    assert [i for r in ranges for i in r] == list(range(70))
    # the planner keeps the embedding table off stage 0's GPU (cpu_embeddings), so its split is
    # not the even one: the runtime follows the planner
    assert ranges != split_blocks(70, 8)


def test_default_stage_ranges_fall_back_to_the_even_split_when_the_planner_cannot_model_it(monkeypatch):
    import bytetune.plan

    def refuse(*args, **kwargs):
        raise ValueError("no model of this")

    monkeypatch.setattr(bytetune.plan, "pipeline_stages", refuse)
    cfg = load_recipe("tiny_lora8", {"model.shrink.num_layers": 5})
    from bytetune.plan.spec import model_config_from_recipe

    with pytest.warns(UserWarning, match="the planner cannot split this model"):
        assert default_ranges(cfg, model_config_from_recipe(cfg), 5, 2) == split_blocks(5, 2)


def test_a_hub_model_id_is_read_from_its_downloaded_snapshot(tmp_path, monkeypatch, checkpoints):
    """No network: snapshot_download is replaced by the local checkpoint it would have made."""
    import huggingface_hub

    from bytetune.trainer.pipeline import HUB_PATTERNS, build_stage, check_pipeline_recipe

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, list(allow_patterns)))
        return str(checkpoints["bloom"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    overrides = overrides_for(tmp_path, checkpoints["bloom"], micro_batches=2, **{"parallel.strategy": "pipeline"})
    cfg = load_recipe("tiny_lora8", {**overrides, "model.name_or_path": "someone/tiny-bloom"})
    check_pipeline_recipe(cfg, 2)  # no longer refused
    stage, _, info = build_stage(cfg, 1, 2, torch.device("cpu"))
    assert asked == [("someone/tiny-bloom", HUB_PATTERNS)] and "*.safetensors" in HUB_PATTERNS
    assert info["bytes_read"] > 0 and info["ranges"] == [range(0, 2), range(2, 4)]
    assert stage.last and not stage.first
    assert cfg.model.name_or_path == "someone/tiny-bloom"  # the run's recipe keeps the hub id


@pytest.mark.parametrize("embeddings,cpu_embeddings", [("int8", True), ("int8", False), (None, True)])
def test_split_embeddings_give_the_one_process_codes_and_loss(tmp_path, checkpoints, embeddings, cpu_embeddings):
    """quantization.embeddings=int8 and parallel.pipeline.cpu_embeddings (bloom_lora8_pp): stage 0
    holds the (int8) table, in host memory with cpu_embeddings, the last stage an untied int8 head
    of the same codes; run one after the other in this process, the two stages give the loss of
    the whole model loaded and quantized the one-process way."""
    from bytetune.quant_layers.int8_embedding import Int8Embedding, Int8Head
    from bytetune.trainer.loss import _summed_ce_of_logits
    from bytetune.trainer.pipeline import HostEmbedding, build_stage
    from bytetune.trainer.trainer import build_model

    overrides = overrides_for(tmp_path, checkpoints["bloom"], micro_batches=2, **{"quantization.embeddings": embeddings})
    cfg = load_recipe("tiny_lora8", {**overrides, "parallel.strategy": "pipeline",
                                     "parallel.pipeline.cpu_embeddings": cpu_embeddings})
    first, _, first_info = build_stage(cfg, 0, 2, torch.device("cpu"))
    last, _, _ = build_stage(cfg, 1, 2, torch.device("cpu"))
    whole, _ = build_model(load_recipe("tiny_lora8", overrides))
    table = first.peft_model.get_base_model().get_input_embeddings()
    if cpu_embeddings:
        assert isinstance(table, HostEmbedding)
        table = table.table
        # the table stays in host memory whatever device the stage is moved to (meta standing
        # in for a GPU here): the blocks move, the table does not
        first.peft_model.to("meta")
        assert table.weight.device.type == "cpu"
        assert all(p.device.type == "meta" for n, p in first.peft_model.named_parameters() if ".h." in n)
        first, _, info = build_stage(cfg, 0, 2, torch.device("cpu"))
        assert info["bytes_read"] == first_info["bytes_read"]  # the table was read (once)
        table = first.peft_model.get_base_model().get_input_embeddings().table
    head = last.peft_model.get_base_model().get_output_embeddings()
    reference = whole.get_base_model().get_input_embeddings()
    assert first.peft_model.get_base_model().get_output_embeddings() is None
    if embeddings == "int8":
        assert isinstance(table, Int8Embedding) and isinstance(reference, Int8Embedding)
        assert isinstance(head, Int8Head) and not head.tied
        assert table.weight.dtype == head.weight.dtype == torch.int8
        assert torch.equal(table.weight_scale, reference.weight_scale)
        assert torch.equal(head.row_scale, reference.weight_scale)
    assert torch.equal(table.weight, reference.weight) and torch.equal(head.weight, reference.weight)

    generator = torch.Generator().manual_seed(20)
    ids = torch.randint(0, whole.get_base_model().config.vocab_size, (2, 17), generator=generator)
    mask = torch.ones_like(ids)
    whole.eval(), first.eval(), last.eval()
    with torch.no_grad():
        got = last.summed_loss(last(first(ids, attention_mask=mask), attention_mask=mask), ids, fused=False)
        want = _summed_ce_of_logits(whole(input_ids=ids, attention_mask=mask).logits, ids)
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
