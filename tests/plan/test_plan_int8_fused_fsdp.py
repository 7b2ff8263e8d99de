"""Planner: int8 embeddings/head and the fused linear+CE loss against shapes and the real layers,
FSDP2 shards, gathered groups and nodes."""


import pytest
import torch
from transformers import BloomConfig, LlamaConfig

from bytetune.kernels import fused_linear_ce
from bytetune.plan import PlanSpec, Planner, plan_memory

# Odd hidden size (not a multiple of the 8-bit optimizer's blocks); vocab several times the
# hidden size so the fused loss runs in more than one chunk.
H, V, LAYERS = 72, 500, 3
BLOOM = dict(hidden_size=H, n_layer=LAYERS, n_head=4, vocab_size=V)


def spec(config=None, **overrides) -> PlanSpec:
    fields = dict(model_config=config or BloomConfig(**BLOOM), seq_len=40, micro_batch=2,
                  gradient_checkpointing=True, compute_dtype="float32", lora_r=4, lora_alpha=8, name="small")
    fields.update(overrides)
    return PlanSpec(**fields)


def small_llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=V, tie_word_embeddings=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_embeddings_replace_the_float_table_by_codes_and_row_scales(dtype):
    from transformers import AutoModelForCausalLM

    from bytetune.quant_layers.int8_embedding import quantize_embeddings

    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for config, tables in ((BloomConfig(**BLOOM), 1), (small_llama(), 2)):  # tied: one table; untied: two
        plain = Planner(spec(config, compute_dtype=dtype)).totals()
        int8 = Planner(spec(config, compute_dtype=dtype, embeddings="int8")).totals()
        # From the shapes: each [V, H] table leaves the float weights and comes back as int8
        # codes plus a float32 scale per row.
        assert plain["other_weights"] - int8["other_weights"] == tables * V * H * width
        assert int8["quantized_weights"] - plain["quantized_weights"] == tables * (V * H + 4 * V)
        # ... which is what the real layers hold.
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        held = quantize_embeddings(model)
        assert held["embedding_bytes"] + held["head_bytes"] == tables * (V * H + 4 * V)


def _chunk_tokens_of_a_real_call(n_tokens: int, monkeypatch) -> int:
    """Rows per chunk that fused_linear_cross_entropy really uses for [n_tokens, H] x [V, H]."""
    rows = []
    real = fused_linear_ce.cross_entropy_rows

    def spy(logits, targets):
        rows.append(logits.shape[0])
        return real(logits, targets)

    monkeypatch.setattr(fused_linear_ce, "cross_entropy_rows", spy)
    hidden = torch.randn(n_tokens, H, requires_grad=True)
    fused_linear_ce.fused_linear_cross_entropy(hidden, torch.randint(0, V, (n_tokens,)), weight=torch.randn(V, H))
    assert sum(rows) == n_tokens
    return rows[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_loss_phase_holds_chunks_not_the_logits(batch, monkeypatch):
    seq, tokens = 40, batch * 40
    targets = batch * (seq - 1)  # next-token targets of a packed block
    plain = Planner(spec(micro_batch=batch, seq_len=seq))
    fused = Planner(spec(micro_batch=batch, seq_len=seq, fused_cross_entropy=True))
    chunk = fused_linear_ce.default_chunk_tokens(targets, H, V)  # a GPU call's chunk
    assert targets / chunk > 1  # chunked
    chunk_cpu = _chunk_tokens_of_a_real_call(targets, monkeypatch)  # larger on a CPU
    # Plain (fp32): logits [tokens, V] live through the loss, and its backward holds the log-softmax
    # gradient and the logits' gradient at once; the log-softmax output itself is saved.
    assert plain.trace.loss.peak("cuda") == 2 * tokens * V * 4
    saved_log_softmax = plain.trace.after_blocks - fused.trace.after_blocks
    assert tokens * V * 4 <= saved_log_softmax <= tokens * V * 4 + 64 * tokens  # + int64 labels
    # Fused (fp32, CUDA kernels): the gradient w.r.t. the hidden states is kept to the backward;
    # forward: one chunk's logits and its input gradient (+ the shifted hidden states copied when
    # batch > 1); backward: the scaled gradient and the shifted view's gradient.
    forward = chunk * V * 4 + chunk * H * 4 + (targets * H * 4 if batch > 1 else 0)
    backward = targets * H * 4 + tokens * H * 4
    assert fused.trace.loss.peak("cuda") == targets * H * 4 + max(forward, backward)
    # CPU: larger chunks, and the reference CE adds a float32 buffer of the chunk's logits.
    forward_cpu = 2 * chunk_cpu * V * 4 + (targets * H * 4 if batch > 1 else 0)
    assert fused.trace.loss.peak("cpu") == targets * H * 4 + max(forward_cpu, backward)
    # Together: the loss phase loses the saved log-softmax and the two [tokens, V] float32 buffers.
    assert plain.loss_phase("cuda") - fused.loss_phase("cuda") == (
        saved_log_softmax + 2 * tokens * V * 4 - fused.trace.loss.peak("cuda")
    )
    assert fused.loss_phase("cuda") < plain.loss_phase("cuda") / 2


def test_fused_loss_phase_in_bf16_with_an_int8_head():
    seq, batch = 40, 2
    tokens, targets = batch * seq, batch * (seq - 1)
    plain = Planner(spec(micro_batch=batch, seq_len=seq, compute_dtype="bfloat16", embeddings="int8"))
    fused = Planner(spec(micro_batch=batch, seq_len=seq, compute_dtype="bfloat16", embeddings="int8",
                         fused_cross_entropy=True))
    # Plain bf16: bf16 logits and their float32 copy; backward two float32 gradients and the cast back.
    assert plain.trace.loss.peak("cuda") == max(tokens * V * (2 + 4), 2 * tokens * V * 4 + tokens * V * 2)
    chunk = fused_linear_ce.default_chunk_tokens(targets, H, V)
    # Fused: hidden states float32 (autocast's final norm), cast to bf16 per chunk; bf16 chunk logits.
    forward = targets * H * 4 + chunk * H * 2 + chunk * V * 2 + chunk * H * 2
    assert fused.trace.loss.peak("cuda") == targets * H * 4 + max(forward, targets * H * 4 + tokens * H * 4)


def _block_bytes(compute: int, r: int = 4) -> tuple[int, int, int]:
    """(int8 codes, fp32 scales, everything else gathered) of one small-BLOOM block, from its shapes."""
    outs = [3 * H, H, 4 * H, H]  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    ins = [H, H, H, 4 * H]
    codes = sum(o * i for o, i in zip(outs, ins))
    scales = 4 * sum(outs)
    biases_and_norms = compute * (sum(outs) + 2 * 2 * H)
    lora = 4 * r * sum(o + i for o, i in zip(outs, ins))
    return codes, scales, biases_and_norms + lora


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_shards_the_frozen_bytes_and_adds_the_gathered_groups(reshard):
    s = spec(compute_dtype="bfloat16", embeddings="int8", fused_cross_entropy=True, parallel="fsdp",
             reshard_after_forward=reshard)
    planner = Planner(s)
    codes, scales, rest = _block_bytes(compute=2)
    root_codes = V * H  # the tied int8 table (its row scales are a buffer: unsharded)
    root_rest = 2 * (2 * H + 2 * H)  # word_embeddings_layernorm and ln_f, bf16
    one, two = planner.plan("1x100GiB"), planner.plan("2x100GiB")
    for device in two.devices:
        # Each of 2 devices: half of the int8 codes, all of the scales.
        assert device.quantized_weights == (LAYERS * codes + root_codes) // 2 + LAYERS * scales + 4 * V
        assert 2 * device.lora_params == one.devices[0].lora_params
        assert device.gathered == (2 if reshard else LAYERS) * (codes + rest) + root_codes + root_rest
        # Every device runs the whole model on its own micro-batch.
        assert device.activations == planner.activations(True)
    assert one.devices[0].quantized_weights == LAYERS * (codes + scales) + root_codes + 4 * V
    assert two.parallel == "fsdp" and two.device_map == {}
    assert not two.fused_loss  # the trainer takes the full-logits loss under FSDP2


def test_nodes_multiply_the_devices_and_need_fsdp():
    s = spec(compute_dtype="bfloat16")
    two_nodes = plan_memory(s, "2x100GiB", find_min=False, parallel="fsdp", nodes=2)
    assert len(two_nodes.devices) == 4 and two_nodes.nodes == 2 and two_nodes.fits
    four = plan_memory(s, "4x100GiB", find_min=False, parallel="fsdp")
    assert [d.total for d in two_nodes.devices] == [d.total for d in four.devices]
    with pytest.raises(ValueError, match="parallel=fsdp"):
        plan_memory(s, "2x100GiB", find_min=False, nodes=2)


def test_fsdp_min_devices_is_the_smallest_that_fits():
    planner = Planner(spec(compute_dtype="bfloat16", parallel="fsdp"))
    single = planner.plan("1x100GiB").devices[0]
    # A device short of a third of the shardable bytes that one device holds alone.
    shardable = single.quantized_weights + single.other_weights + single.lora_params + single.lora_grads + \
        single.optimizer_states
    size = single.total - shardable // 3
    n = planner.find_min_devices(size)
    assert n is not None and n >= 2
    assert planner.plan(f"{n}x{size}B").fits and not planner.plan(f"{n - 1}x{size}B").fits
    # Below what no sharding shrinks (gathered groups, activations, runtime), no count fits.
    assert planner.find_min_devices(single.gathered) is None
