"""Planner, parallel=pipeline: per-stage memory, the balanced split, the idle fraction and the
throughput model, checked against figures computed by hand from the model's shapes."""

import dataclasses
import itertools
import json

import pytest
from transformers import BloomConfig

from bytetune.plan import Device, PlanSpec, Planner, pipeline_stages, plan_memory, spec_from_recipe
from bytetune.plan.__main__ import main as plan_cli
from bytetune.plan.devices import GiB
from bytetune.plan.pipeline import in_flight
from bytetune.plan.throughput import GPU_KINDS, idle_fraction, interleaved_pipeline_step, link_bandwidth, pipeline_step
from bytetune.recipe.schema import load_recipe

# Odd sizes on purpose (not multiples of the optimizer's 256-element blocks).
SMALL = dict(hidden_size=72, n_layer=7, n_head=4, vocab_size=500)


def small_spec(**overrides) -> PlanSpec:
    fields = dict(model_config=BloomConfig(**SMALL), seq_len=24, micro_batch=2, gradient_checkpointing=True,
                  compute_dtype="float32", lora_r=4, lora_alpha=8, lora_dropout=0.0, parallel="pipeline",
                  micro_batches=8, name="small-bloom")
    fields.update(overrides)
    return PlanSpec(**fields)


@pytest.fixture(scope="module")
def small_planner():
    return Planner(small_spec())


@pytest.fixture(scope="module")
def bloom_pp():
    """The bloom_lora8_pp recipe's planner and its plan on 8 x 24 GiB (one meta BLOOM-176B)."""
    planner = Planner(spec_from_recipe(load_recipe("bloom_lora8_pp", check_paths=False)))
    return planner, planner.plan("8x24GiB")


def test_idle_fraction_is_the_bubble_of_equal_stages():
    assert idle_fraction(8, 16) == pytest.approx(7 / 23)
    assert idle_fraction(8, 32) == pytest.approx(7 / 39)
    assert idle_fraction(1, 5) == 0
    # Four equal stages of 1 s per micro-batch, 8 micro-batches: 11 s, busy 4 x 8 of 4 x 11.
    step, compute, comm = pipeline_step([1.0] * 4, [0.0] * 4, 8)
    assert (step, compute, comm) == (11.0, 11.0, 0.0)
    assert 1 - 8 * 4 / (4 * step) == pytest.approx(idle_fraction(4, 8))


def test_plan_reports_the_idle_fraction(small_planner):
    plan = small_planner.plan("4x1GiB")
    assert plan.parallel == "pipeline" and len(plan.stages) == 4
    assert plan.idle_fraction == pytest.approx(3 / 11)  # p=4, m=8
    assert "idle fraction (p-1)/(m+p-1) = 3/11" in plan.table()
    data = plan.as_dict()
    assert data["pipeline"]["idle_fraction"] == pytest.approx(3 / 11)
    assert sum(stop - start for start, stop in data["pipeline"]["stages"]) == SMALL["n_layer"]


def test_micro_batches_in_flight_per_schedule():
    assert [in_flight("1f1b", k, 4, 8) for k in range(4)] == [4, 3, 2, 1]
    assert [in_flight("1f1b", k, 4, 2) for k in range(4)] == [2, 2, 2, 1]
    assert [in_flight("gpipe", k, 4, 8) for k in range(4)] == [8] * 4
    # interleaved, p=4, V=2, m=8 (4 micro-batches per round): rank r runs 4 + 2 (3 - r) forwards
    # before its first backward, then one more before each backward
    assert [in_flight("interleaved_1f1b", r, 4, 8, per_rank=2) for r in range(4)] == [11, 9, 7, 5]
    # p=2, V=2, m=2: rank 0's warmup is every forward (4), rank 1 runs 2, then pairs
    assert [in_flight("interleaved_1f1b", r, 2, 2, per_rank=2) for r in range(2)] == [4, 3]
    with pytest.raises(ValueError, match="interleaved_1f1b"):
        in_flight("zero_bubble", 0, 4, 8)


def _torch_rank_order(rank, ranks, per_rank, micro_batches):
    """(local stage, +1 forward / -1 backward) of ``rank`` as torch's ScheduleInterleaved1F1B lays
    them out (its own per-rank computation, without a process group: the method reads these four
    attributes only)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    schedule = SimpleNamespace(n_local_stages=per_rank, pp_group_size=ranks, _n_microbatches=micro_batches,
                               microbatches_per_round=micro_batches // max(1, micro_batches // ranks))
    actions = ScheduleInterleaved1F1B._calculate_single_rank_operations(schedule, rank)
    return [((a.stage_index - rank) // ranks, 1 if a.computation_type == _ComputationType.FORWARD else -1)
            for a in actions if a is not None]


@pytest.mark.parametrize("ranks,per_rank,micro_batches", [(2, 2, 2), (2, 2, 3), (2, 3, 4), (4, 2, 8), (4, 2, 12),
                                                           (3, 2, 6), (4, 3, 3), (8, 2, 16)])
def test_interleaved_order_and_in_flight_are_torchs_schedule(ranks, per_rank, micro_batches):
    from bytetune.plan.pipeline import interleaved_order, interleaved_peak

    for rank in range(ranks):
        order = _torch_rank_order(rank, ranks, per_rank, micro_batches)
        assert interleaved_order(rank, ranks, per_rank, micro_batches) == order
        assert sorted(order).count((0, 1)) == micro_batches  # every micro-batch, forward and backward
        alive, most = 0, 0
        for _, change in order:
            alive += change
            most = max(most, alive)
        assert in_flight("interleaved_1f1b", rank, ranks, micro_batches, per_rank=per_rank) == most
        # weights 1 per local stage: the weighted peak is the count's
        assert interleaved_peak(rank, ranks, per_rank, micro_batches, [1] * per_rank)[0] == most


def test_interleaved_plan_sums_a_gpus_stages_and_takes_its_schedules_peak(small_planner):
    spec = dataclasses.replace(small_planner.spec, pipeline_schedule="interleaved_1f1b", pipeline_stages_per_rank=2,
                               micro_batches=2)
    planner = Planner(spec, model=small_planner.model, trace=small_planner.trace)
    hidden = spec.micro_batch * spec.seq_len * SMALL["hidden_size"] * 4
    model = planner.stage_model
    device = Device("cuda:0", GiB)
    runs = [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    gpu0, gpu1 = (model.rank_plan(device, r, 2, runs) for r in (0, 1))
    assert gpu0.units == [*model.before_units, *small_planner.block_names[0:2], *small_planner.block_names[4:6]]
    # Rank 0 runs all 4 forwards first (its warmup is m*V); rank 1 two, then forward-backward pairs.
    assert gpu0.in_flight == 4 and gpu1.in_flight == 3
    part0, part2 = model.stage_plan(device, 0, 4, 0, 2), model.stage_plan(device, 2, 4, 4, 2)
    # stage 2 (blocks 4-5, neither end): per micro-batch its 2 block inputs, the first one the
    # receive buffer, plus its output: 2 hidden; both micro-batches in flight at its peak
    assert part2.in_flight == 2 and part2.activations == 2 * 2 * hidden
    assert gpu0.activations == part0.activations + part2.activations  # all forwards first: the peaks coincide
    # receive buffers, every micro-batch: stage 0 its output gradient, stage 2 input and gradient
    assert gpu0.buffers == (1 + 2) * 2 * hidden
    for field in ("quantized_weights", "lora_params", "optimizer_states"):
        assert getattr(gpu0, field) == getattr(part0, field) + getattr(part2, field)
    # rank 1 (stages 1 and 3): F F on stage 1, then F B on stage 3 twice: stage 1's two and one of
    # stage 3's at the peak
    part1, part3 = model.stage_plan(device, 1, 4, 2, 2), model.stage_plan(device, 3, 4, 6, 1)
    assert part1.in_flight == 2 and part3.in_flight == 1
    assert gpu1.activations == part1.activations + part3.activations
    assert gpu1.temporary == max(part1.temporary, part3.temporary)


def test_interleaved_plan_places_v_stages_per_gpu_with_the_smaller_bubble(small_planner):
    spec = dataclasses.replace(small_planner.spec, pipeline_schedule="interleaved_1f1b", pipeline_stages_per_rank=2)
    plan = Planner(spec, model=small_planner.model, trace=small_planner.trace).plan("2x1GiB")
    assert len(plan.devices) == 2 and len(plan.stages) == 4
    assert [i for r in plan.stages for i in r] == list(range(SMALL["n_layer"]))
    assert plan.idle_fraction == pytest.approx(1 / (2 * 8 + 1))  # (p-1)/(V*m+p-1), p=2, V=2, m=8
    assert "(p-1)/(V*m+p-1) = 1/17" in plan.table()
    unlimited = pipeline_stages(spec, 4)  # what the trainer asks for: p*V stages, no memory limit
    assert len(unlimited) == 4 and [i for r in unlimited for i in r] == list(range(SMALL["n_layer"]))
    with pytest.raises(ValueError, match="multiple of 2"):
        pipeline_stages(spec, 3)
    with pytest.raises(ValueError, match="interleaved_1f1b takes 2 or more"):
        dataclasses.replace(spec, pipeline_stages_per_rank=1)
    # the step model: p=4 equal devices of 1 s per micro-batch over their V=2 stages, m=8:
    # 8 + 3/2 s, idle (p-1)/(V*m+p-1) = 3/19
    step, compute, comm = interleaved_pipeline_step([1.0] * 4, [0.0] * 4, 8, 2)
    assert (step, compute, comm) == (9.5, 9.5, 0.0)
    assert 1 - 8 * 4 / (4 * step) == pytest.approx(idle_fraction(4, 8, per_rank=2)) == pytest.approx(3 / 19)


def test_stage_memory_counts_inputs_in_flight_and_receive_buffers_by_hand(small_planner):
    spec = small_planner.spec
    # One hidden-state tensor per micro-batch: micro_batch x seq x hidden float32.
    hidden = spec.micro_batch * spec.seq_len * SMALL["hidden_size"] * 4
    stages = small_planner.stage_model
    device = Device("cuda:1", GiB)
    middle = stages.stage_plan(device, 1, 4, 2, 2)  # stage 1 of 4, blocks 2-3, 1F1B, m=8
    # 3 micro-batches in flight, each: 2 block inputs (the first one the receive buffer) + the stage output.
    assert middle.in_flight == 3
    assert middle.activations == 3 * 2 * hidden
    # Receive buffers for each of the 8 micro-batches: its input and its output gradient.
    assert middle.buffers == 2 * 8 * hidden
    gpipe = Planner(dataclasses.replace(spec, pipeline_schedule="gpipe"), model=small_planner.model,
                    trace=small_planner.trace).stage_model
    assert gpipe.stage_plan(device, 1, 4, 2, 2).activations == 8 * 2 * hidden


def test_stage_memory_grows_with_micro_batches_in_flight(small_planner):
    stages = small_planner.stage_model
    device = Device("cuda:0", GiB)
    # The same two blocks on stages 2, 1, 0 of 4: 2, 3, 4 micro-batches in flight under 1F1B.
    totals = [stages.stage_plan(device, k, 4, 2, 2) for k in (2, 1)]
    assert totals[0].in_flight < totals[1].in_flight
    assert totals[0].activations < totals[1].activations and totals[0].total < totals[1].total
    # GPipe keeps every micro-batch: more micro-batches per step, more memory on every stage.
    previous = None
    for m in (1, 2, 4, 8, 16):
        spec = dataclasses.replace(small_planner.spec, pipeline_schedule="gpipe", micro_batches=m)
        planner = Planner(spec, model=small_planner.model, trace=small_planner.trace)
        plan = planner.stage_model.stage_plan(device, 1, 4, 2, 2)
        assert plan.in_flight == m
        if previous is not None:
            assert plan.activations > previous.activations and plan.total > previous.total
        previous = plan


def _brute_force(planner, devices):
    """Every split into contiguous non-empty runs: the fitting ones with the least work on the
    busiest stage, then the most headroom; FLOPs per block by hand from the shapes."""
    n, p = len(planner.block_names), len(devices)
    spec = planner.spec
    h, s = SMALL["hidden_size"], spec.seq_len
    lora = spec.lora_r * (h + 3 * h + h + h + h + 4 * h + 4 * h + h)  # qkv, dense, h_to_4h, 4h_to_h
    block = 6 * 12 * h * h + 8 * lora + 16 * s * h
    head = 4 * SMALL["vocab_size"] * h
    best = None
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0, *cuts, n)
        runs = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        plans = [planner.stage_model.stage_plan(d, k, p, r.start, len(r))
                 for k, (d, r) in enumerate(zip(devices, runs))]
        if not all(pl.fits for pl in plans):
            continue
        work = max(len(r) * block + (head if k == p - 1 else 0) for k, r in enumerate(runs))
        key = (work, -min(pl.headroom for pl in plans))
        if best is None or key < best[0]:
            best = (key, runs)
    return best


@pytest.mark.parametrize("stages,capacity", [(2, "1GiB"), (3, "1GiB"), (4, "1GiB"), (7, "1GiB"), (3, "tight"),
                                             (3, "first-small")])
def test_split_covers_every_block_contiguously_and_is_the_best(small_planner, stages, capacity):
    devices = [Device(f"cuda:{i}", GiB) for i in range(stages)]
    stage_plan = small_planner.stage_model.stage_plan
    if capacity == "tight":
        # Room for three blocks on a middle stage, one byte to spare.
        size = stage_plan(Device("cuda:1", GiB), 1, stages, 0, 3).total + 1
        devices = [Device(f"cuda:{i}", size) for i in range(stages)]
    elif capacity == "first-small":
        # The first GPU holds one block only: the others take more than the fastest split gives them.
        devices[0] = Device("cuda:0", stage_plan(devices[0], 0, stages, 0, 1).total + 1)
    plan = small_planner.plan(devices)
    runs = plan.stages
    assert len(runs) == stages and runs[0].start == 0 and runs[-1].stop == SMALL["n_layer"]
    assert all(len(r) >= 1 for r in runs)
    assert all(a.stop == b.start for a, b in zip(runs, runs[1:]))
    # Each block in exactly one stage, in order.
    assert [i for r in runs for i in r] == list(range(SMALL["n_layer"]))
    best = _brute_force(small_planner, devices)
    assert best is not None and plan.fits
    assert [len(r) for r in runs] == [len(r) for r in best[1]]
    if capacity == "first-small":
        assert [len(r) for r in runs] == [1, 3, 3]
    # The embeddings on the first stage, the final norm and head on the last.
    assert "transformer.word_embeddings" in plan.devices[0].units
    assert {"transformer.ln_f", "lm_head"} <= set(plan.devices[-1].units)


def test_advice_for_a_pipeline_that_does_not_fit(small_planner):
    plan = small_planner.plan("2x64MiB")
    assert not plan.fits
    advice = plan.advice()
    assert "parallel.pipeline.micro_batches" in advice and "parallel.pipeline.cpu_embeddings=true" in advice


def test_more_stages_than_blocks_is_an_error(small_planner):
    with pytest.raises(ValueError, match="at most 7 GPUs"):
        small_planner.plan("8x1GiB")


def test_pipeline_stages_for_the_runtime(small_planner):
    runs = pipeline_stages(small_planner.spec, 3)
    assert [i for r in runs for i in r] == list(range(SMALL["n_layer"]))
    assert runs == pipeline_stages(small_planner.spec, 3, "3x1GiB")
    with pytest.raises(ValueError, match="one device per stage"):
        pipeline_stages(small_planner.spec, 3, "2x1GiB")


def test_tied_head_is_copied_to_the_last_stage_and_cpu_embeddings_free_the_first(small_planner):
    h, v = SMALL["hidden_size"], SMALL["vocab_size"]
    table = v * h * 4  # float32, not quantized (embeddings="none")
    stages = small_planner.stage_model
    device = Device("cuda:0", GiB)
    last = stages.stage_plan(device, 3, 4, 5, 2)
    alone = stages.stage_plan(device, 0, 1, 0, 7)  # one stage: the tied table once
    assert last.other_weights - stages.stage_plan(device, 2, 4, 5, 2).other_weights >= table
    cpu = Planner(dataclasses.replace(small_planner.spec, pipeline_cpu_embeddings=True),
                  model=small_planner.model, trace=small_planner.trace).stage_model
    first, first_cpu = stages.stage_plan(device, 0, 4, 0, 2), cpu.stage_plan(device, 0, 4, 0, 2)
    assert first.other_weights - first_cpu.other_weights == table
    assert cpu.stage_plan(device, 3, 4, 5, 2).other_weights == last.other_weights
    assert cpu.stage_plan(device, 0, 1, 0, 7).other_weights == alone.other_weights


def test_bloom_flops_per_token_by_hand(bloom_pp):
    planner, _ = bloom_pp
    h, s, v, r = 14336, 256, 250880, 16
    n = 12 * h * h  # query_key_value 3h^2, dense h^2, h_to_4h and 4h_to_h 4h^2 each
    lora = r * ((h + 3 * h) + (h + h) + (h + 4 * h) + (4 * h + h))
    per_block, head = planner.stage_model.flops()
    assert per_block[0] == 6 * n + 8 * lora + 16 * s * h
    assert head == 4 * v * h
    assert len(per_block) == 70


def test_bloom_lora8_pp_fits_8x24gib_with_half_a_gib_everywhere(bloom_pp):
    _, plan = bloom_pp
    assert plan.fits and len(plan.devices) == 8
    assert min(d.headroom for d in plan.devices) >= 0.5 * GiB
    assert [i for r in plan.stages for i in r] == list(range(70))
    assert plan.idle_fraction == pytest.approx(7 / 23)
    # 1F1B: stage k keeps 8 - k micro-batches in flight.
    assert [d.in_flight for d in plan.devices] == [8, 7, 6, 5, 4, 3, 2, 1]


def test_throughput_ordering_for_bloom_176b_on_8x24gib_over_pcie(bloom_pp):
    planner, plan = bloom_pp
    model = planner.throughput_model("8x24GiB", gpu="rtx4090", link="pcie4", efficiency=0.4, pipeline=plan)
    dm, pp, fs = (model.speed(k) for k in ("device_map", "pipeline", "fsdp2"))
    assert pp.tokens_per_s > dm.tokens_per_s and pp.tokens_per_s > fs.tokens_per_s
    assert dm.fits and pp.fits and not fs.fits  # FSDP2 needs 16 x 24 GiB for BLOOM-176B

    # By hand: 70 blocks of 6N + 8l + 16sh FLOPs per token plus the head's 4Vh, at 0.4 x 165.2 TFLOP/s.
    h, s, v, m, layers = 14336, 256, 250880, 16, 70
    n, lora = 12 * h * h, 16 * 16 * h
    block, head = 6 * n + 8 * lora + 16 * s * h, 4 * v * h
    rate = 0.4 * 165.2e12
    hidden_bytes = s * h * 2
    assert dm.tokens_per_s == pytest.approx(rate / (layers * block + head), rel=3e-3)  # + 7 boundaries' traffic
    # Pipeline: 9 blocks on the busiest stage (70 = 7 x 9 + 7): (m + p - 1) passes of it, less the last
    # stage's lighter first pass; each pass also sends one micro-batch's hidden states each way.
    nine = s * 9 * block / rate
    last = s * (7 * block + head) / rate
    step = 7 * nine + last + (m - 1) * nine
    assert pp.step_s == pytest.approx(step, rel=2e-3)
    assert pp.tokens_per_s == pytest.approx(m * s / step, rel=2e-3)
    # FSDP2: 2 micro-batches per rank, each all-gathering 7/8 of the int8 block weights twice over 25 GB/s.
    gather = 2 * layers * n * 7 / 8 / 25e9
    # (plus the LoRA weights, biases and norms gathered with them, the root once, the gradients reduced once)
    assert fs.comm_s == pytest.approx(2 * gather, rel=0.02)
    assert fs.tokens_per_s == pytest.approx(8 * 2 * s / (2 * gather), rel=0.02)
    assert fs.comm_s > 10 * hidden_bytes * 2 * m / 25e9  # a pipeline moves a tiny fraction of that
    table = model.table()
    assert "device_map" in table and "pipeline" in table and "fsdp2" in table
    assert "DOES NOT FIT" in table


def test_gpu_kinds_and_links():
    assert GPU_KINDS["rtx4090"].bf16_tflops == 165.2 and GPU_KINDS["a100"].bf16_tflops == 312
    assert link_bandwidth("pcie4", GPU_KINDS["rtx4090"]) == 25e9
    assert link_bandwidth("40GB/s", GPU_KINDS["rtx4090"]) == 40e9
    assert link_bandwidth("nvlink", GPU_KINDS["h100"]) == 450e9
    for bad in ("nvlink", "fast", "0GB/s"):
        with pytest.raises(ValueError):
            link_bandwidth(bad, GPU_KINDS["rtx4090"])


def test_cli_pipeline_json_and_one_line_errors(capsys):
    args = ["recipe=tiny_lora8", "gpus=2x1GiB", "parallel=pipeline", "training.seq_len=32"]
    assert plan_cli(args + ["json=-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parallel"] == "pipeline" and len(data["pipeline"]["stages"]) == 2
    assert [s["strategy"] for s in data["throughput"]["strategies"]] == ["device_map", "pipeline", "fsdp2"]
    assert data["throughput"]["gpu"] == "rtx4090" and data["throughput"]["efficiency"] == 0.4
    for bad, word in (("gpu=rtx9090", "gpu="), ("link=nvlink", "NVLink"), ("efficiency=2", "efficiency")):
        assert plan_cli(args + [bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and word in err[0]


def test_plan_memory_adds_the_model_when_asked_and_for_pipelines_on_gpus():
    spec = small_spec()
    assert plan_memory(spec, "2x1GiB", find_min=False).throughput is None  # the trainer's check: memory only
    plan = plan_memory(spec, "2x1GiB", find_min=False, throughput=None)
    assert plan.throughput is not None and plan.throughput.speed("pipeline").gpus_used == 2
    assert plan_memory(spec, "cpu:4GiB", find_min=False, throughput=None).throughput is None  # CPU: memory only
    with pytest.raises(ValueError, match="for GPUs"):
        plan_memory(spec, "cpu:4GiB", find_min=False, gpu="a100")


def test_the_trainer_plans_a_pipeline_over_world_size_gpus(monkeypatch):
    import types

    import torch

    from bytetune.plan import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=3 * GiB))
    monkeypatch.setenv("WORLD_SIZE", "4")
    pipeline = load_recipe("tiny_lora8", ["parallel.strategy=pipeline"], check_paths=False)
    assert runtime.local_devices(pipeline) == [Device(f"cuda:{i}", 3 * GiB) for i in range(4)]
    one = load_recipe("tiny_lora8", check_paths=False)
    assert runtime.local_devices(one) == [Device("cuda:0", 3 * GiB)]
