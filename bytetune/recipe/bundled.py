"""Model configs bundled with bytetune: the architectures of the shipped recipes, built without
downloading anything (offline CI runs, the memory planner), and shrunken copies of them."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"

# Config keys that set depth / width / heads, per naming family (BLOOM vs Llama-style).
_LAYER_KEYS = ("n_layer", "num_hidden_layers")
_HEAD_KEYS = ("n_head", "num_attention_heads")
# Config keys that bound the positions a model can embed, by naming family (Llama-style, GPT-2,
# GPT-J/GPT-Neo, ChatGLM...). A model without any (BLOOM: ALiBi) takes any length.
MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")  # Llama-style, Falcon
# Widths that scale with hidden_size (dense MLP, MoE experts, shared expert, Falcon's FFN).
_WIDTH_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size")
# Mixture-of-experts: a shrunken copy keeps at most this many experts, routing to at most 2.
_EXPERT_KEYS = ("num_local_experts", "num_experts")
SHRUNK_MAX_EXPERTS = 4


def bundled_model_config(name: str) -> dict:
    path = MODEL_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in MODEL_CONFIGS_DIR.glob("*.json")))
        raise FileNotFoundError(f"model.config_file={name!r} is not bundled: choose one of {valid}")
    return json.loads(path.read_text())


def shrink_model_config(config: dict, shrink) -> dict:
    """A small copy of ``config``: fewer layers, narrower, fewer heads (CI runs of big recipes)."""
    config = dict(config)
    for key in _LAYER_KEYS:
        if key in config and shrink.num_layers:
            config[key] = shrink.num_layers
    if shrink.hidden_size:
        old_hidden = config["hidden_size"]
        config["hidden_size"] = shrink.hidden_size
        for key in _WIDTH_KEYS:
            if config.get(key):
                config[key] = max(1, config[key] * shrink.hidden_size // old_hidden)
        for key in _EXPERT_KEYS:
            if config.get(key):
                config[key] = min(config[key], SHRUNK_MAX_EXPERTS)
        if config.get("num_experts_per_tok"):
            config["num_experts_per_tok"] = min(config["num_experts_per_tok"], 2)
    if shrink.num_heads:
        for key in _HEAD_KEYS:
            if key in config:
                old_heads = config[key]
                config[key] = shrink.num_heads
                for kv_key in _KV_HEAD_KEYS:
                    if config.get(kv_key):
                        # keep grouped-query attention: the same number of query heads per kv head
                        group = max(1, old_heads // config[kv_key])
                        config[kv_key] = max(1, shrink.num_heads // group)
                config.pop("head_dim", None)
    if shrink.vocab_size:
        config["vocab_size"] = shrink.vocab_size
    heads = next(config[k] for k in _HEAD_KEYS if k in config)
    if config["hidden_size"] % heads:
        raise ValueError(
            f"model.shrink gives hidden_size {config['hidden_size']} not divisible by {heads} heads: "
            "set model.shrink.num_heads to a divisor"
        )
    return config


def max_positions(config) -> tuple[str, int] | None:
    """(key, value) of the longest sequence a model config allows, or None when it sets no bound;
    ``config`` is a config dict or a transformers config object."""
    for key in MAX_POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def seq_len_error(config, seq_len: int, key: str = "training.seq_len", model: str = "the model") -> str | None:
    """The one-line error when ``seq_len`` is longer than the positions ``config`` allows, else None."""
    bound = max_positions(config)
    if bound is None or seq_len <= bound[1]:
        return None
    name, value = bound
    return (f"{key}={seq_len} is longer than {model} allows ({name}={value} in its config): "
            f"set {key}={value} or lower")
