"""The planner counts ZeroQuant bases by their real layout: INT8 attention, INT4 MLP, fp32 group scales."""

import math

from transformers import BloomConfig

from bytetune.plan import PlanSpec, Planner


def test_zeroquant_weight_bytes_match_the_layout():
    hidden, layers, group = 96, 2, 64
    config = BloomConfig(vocab_size=128, hidden_size=hidden, n_layer=layers, n_head=4)
    spec = PlanSpec(model_config=config, seq_len=16, micro_batch=1, quantization="zeroquant", group_size=group, lora_r=4)
    totals = Planner(spec).totals()

    def layer_bytes(n, k, bits):
        return n * k * bits // 8 + n * math.ceil(k / group) * 4

    per_block = (
        layer_bytes(3 * hidden, hidden, 8)  # self_attention.query_key_value
        + layer_bytes(hidden, hidden, 8)  # self_attention.dense
        + layer_bytes(4 * hidden, hidden, 4)  # mlp.dense_h_to_4h
        + layer_bytes(hidden, 4 * hidden, 4)  # mlp.dense_4h_to_h
    )
    assert totals["quantized_weights"] == layers * per_block
    int8 = Planner(PlanSpec(model_config=config, seq_len=16, micro_batch=1, quantization="int8", lora_r=4)).totals()
    assert totals["quantized_weights"] < 0.75 * int8["quantized_weights"]
