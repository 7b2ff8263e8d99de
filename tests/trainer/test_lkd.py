"""LKD on a tiny config-built Llama: layer-by-layer calibration, saving and the command line."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bytetune.quant_layers import lkd
from bytetune.quant_layers.lkd import FakeQuantLinear, LKDConfig, run_lkd
from bytetune.trainer import lkd_run
from bytetune.trainer.lkd_run import calibration_batches
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.zeroquant import quantize_model_zeroquant

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
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
    batches = calibration_batches(n_batches=2, batch_size=2, seq_len=16, source="random", vocab_size=96)
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
    batches = calibration_batches(n_batches=2, batch_size=4, seq_len=16, source="random", vocab_size=96, seed=1)
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
    batches = calibration_batches(n_batches=1, batch_size=1, seq_len=8, source="random", vocab_size=96)
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


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_llama()
    batches = calibration_batches(n_batches=1, batch_size=2, seq_len=8, source="random", vocab_size=96)
    run_lkd(model, batches, LKDConfig(group_size=32, steps=3), log=lambda s: None)
    lkd.save_quantized(model, tmp_path, meta={"note": "test"})
    loaded = lkd.load_quantized(tiny_llama(seed=5), tmp_path)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_calibration_batches_shapes_and_errors():
    batches = calibration_batches(n_batches=3, batch_size=2, seq_len=5, source="random", vocab_size=10)
    assert len(batches) == 3 and all(b.shape == (2, 5) and int(b.max()) < 10 for b in batches)
    with pytest.raises(ValueError, match="vocab_size"):
        calibration_batches(source="random")
    with pytest.raises(ValueError, match="'text' or 'random'"):
        calibration_batches(source="wiki", vocab_size=10)


def test_decoder_layers_needs_a_stack():
    with pytest.raises(ValueError, match="decoder layers"):
        lkd.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_cli_reads_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lkd_run:\n  model: some/model\n  data: random\n  lkd:\n    steps: 7\n    group_size: 64\n")
    run = lkd_run.parse_cli([f"recipe={recipe}", "lkd.steps=9", "output_dir=out"])
    assert run.model == "some/model" and run.data == "random" and run.output_dir == "out"
    assert run.lkd.steps == 9 and run.lkd.group_size == 64 and run.lkd.act_bits == 16
    with pytest.raises(SystemExit, match="key=value"):
        lkd_run.parse_cli(["steps"])


def test_cli_calibrates_and_saves_a_model(tmp_path, capsys):
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    tiny_llama().save_pretrained(model_dir)
    lkd_run.main(
        [
            f"model={model_dir}",
            f"output_dir={out_dir}",
            "data=random",
            "n_batches=1",
            "batch_size=2",
            "seq_len=8",
            "lkd.steps=2",
            "lkd.group_size=32",
        ]
    )
    printed = capsys.readouterr().out
    assert "lkd layer 1/2" in printed and "lkd layer 2/2" in printed
    loaded = lkd.load_quantized(LlamaForCausalLM.from_pretrained(model_dir), out_dir)
    assert loaded.model.layers[1].mlp.down_proj.bits == 4


def test_a_layer_that_calibration_makes_worse_keeps_its_plain_quantization():
    model = tiny_llama()
    batches = calibration_batches(n_batches=2, batch_size=2, seq_len=8, source="random", vocab_size=96)
    # Absurd steps make the scales and weights overshoot; the guard must undo them.
    reports = run_lkd(model, batches, LKDConfig(group_size=32, steps=5, lr=5.0, weight_lr=1.0), log=lambda s: None)
    for r in reports:
        assert r.mse_after <= r.mse_before


def test_cli_reads_a_fine_tuning_recipe():
    run = lkd_run.parse_cli(["recipe=smollm2_lora4", "lkd.steps=3"])
    assert run.model == "smollm2" and run.output_dir == "runs/lkd/smollm2_lora4"
    assert run.lkd.group_size == 128 and run.lkd.act_bits == 8 and run.lkd.skip == ["lm_head"]
    assert run.lkd.steps == 3
    bloom = lkd_run.parse_cli(["recipe=bloom_lora4"])
    assert bloom.model == "bigscience/bloom"
