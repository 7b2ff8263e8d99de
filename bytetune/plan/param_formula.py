"""Parameter counts written from the architectures' definitions, read off config.json alone: an
independent check of the meta-model count the planner uses (tests compare the two), and the
active parameters per token of mixture-of-experts models."""

from __future__ import annotations

LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral", "qwen3", "qwen3_moe", "qwen2_moe")


def params_from_config(config: dict) -> tuple[int, int]:
    """(total parameters, parameters active per token) of a causal LM's config.json."""
    model_type = config["model_type"]
    if model_type in LLAMA_LIKE:
        return _llama_like(config)
    if model_type == "falcon":
        return _falcon(config)
    raise ValueError(f"no parameter formula for model_type {model_type!r}")


def _llama_like(c: dict) -> tuple[int, int]:
    h, v, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if c["model_type"] in ("qwen2", "qwen2_moe"):
        attention += heads * hd + 2 * kv * hd  # q, k, v biases
    if c["model_type"] in ("qwen3", "qwen3_moe"):
        attention += 2 * hd  # q_norm, k_norm
    norms = 2 * h
    experts = c.get("num_local_experts") or c.get("num_experts") or 0
    total_block = active_block = attention + norms
    if experts:
        width = c.get("moe_intermediate_size") or c["intermediate_size"]
        top_k = c["num_experts_per_tok"]
        total_block += experts * h + experts * 3 * h * width  # router + SwiGLU experts
        active_block += experts * h + top_k * 3 * h * width
    else:
        total_block += 3 * h * c["intermediate_size"]
        active_block = total_block
    outside = v * h + h + (0 if c.get("tie_word_embeddings", False) else v * h)
    return outside + layers * total_block, outside + layers * active_block


def _falcon(c: dict) -> tuple[int, int]:
    h, v, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    hd = h // heads
    if c.get("new_decoder_architecture"):
        kv = c["num_kv_heads"]
        norms = 2 * 2 * h  # ln_attn, ln_mlp (weight + bias)
    else:
        kv = 1 if c.get("multi_query", True) else heads
        norms = 2 * h
    ffn = c.get("ffn_hidden_size") or 4 * h
    bias = c.get("bias", False)
    qkv = h * (heads + 2 * kv) * hd + (heads + 2 * kv) * hd * bias
    block = qkv + h * h + h * bias + 2 * h * ffn + (ffn + h) * bias + norms
    outside = v * h + 2 * h + (0 if c.get("tie_word_embeddings", True) else v * h)
    total = outside + layers * block
    return total, total
