"""KL of the int8 model to fp32 for tiny mixture-of-experts models built from bundled configs
(random weights, seed 0): bytetune's Int8Experts + Int8Linear at threshold 6 and 0, and
bitsandbytes' Linear8bitLt where it can run (nn.Linear only: it cannot take the fused 3-D experts,
so its row quantizes the attention and leaves the experts fp32). The dense control (SmolLM2) is
bench/int8_quality.py.

Run: ``python bench/moe_int8_quality.py [--out bench/results/moe_int8_quality_cpu.md]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import platform
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bytetune.quant_layers import model_bytes, quantize_model  # noqa: E402
from bytetune.quant_layers.convert import default_skip_names  # noqa: E402
from bytetune.recipe import bundled_model_config  # noqa: E402
from bytetune.loaders.local_text import stdlib_text  # noqa: E402
from bytetune.loaders.models import byte_tokenizer  # noqa: E402

CONFIGS = ["tiny-mixtral", "tiny-qwen3-moe"]
INIT_STD = 0.1


def build(name: str):
    config = dict(bundled_model_config(name))
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    # Random weights at the default init (std 0.02) give nearly flat next-token distributions and a
    # KL of ~1e-7 whatever the quantization; std 0.1 makes them peaked enough to tell variants apart.
    config["initializer_range"] = INIT_STD
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32).eval()


@torch.no_grad()
def logprobs(model, windows):
    return torch.cat([model(w[None]).logits.float().log_softmax(-1)[0] for w in windows])


def kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def bnb_variant(model):
    # bench/int8_quality.py's conversion (the same layers as quantize_model, Linear8bitLt with
    # frozen int8 weights, eval mode); the fused experts are no nn.Linear and stay fp32.
    from int8_quality import bitsandbytes_int8

    return bitsandbytes_int8(model, 6.0, torch.device("cpu")).eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = byte_tokenizer()
    ids = tokenizer(stdlib_text("heldout", args.tokens * 2), return_tensors="pt").input_ids[0][: args.tokens]
    windows = ids[: len(ids) // args.window * args.window].view(-1, args.window)
    lines = [
        "# int8 quality of tiny MoE models (random weights from bundled configs)",
        "",
        f"`python bench/moe_int8_quality.py` on {datetime.date.today()}, {platform.node()} ({platform.machine()}, "
        f"torch {torch.__version__}), {windows.numel()} held-out stdlib tokens (byte tokenizer) in windows of {args.window}; "
        f"weights drawn with std {INIT_STD}. bitsandbytes' row converts nn.Linear layers only (the experts stay fp32) and "
        "uses bench/int8_quality.py's conversion.",
        "",
        "| model | variant | mean KL vs fp32 (nats/token) | model MiB | experts int8 |",
        "|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        fp32 = build(name)
        reference = logprobs(fp32, windows)
        lines.append(f"| {name} | fp32 | 0 | {model_bytes(fp32) / 2**20:.2f} | no |")
        for threshold in (6.0, 0.0):
            model = copy.deepcopy(fp32)
            quantize_model(model, threshold=threshold)
            lines.append(f"| {name} | bytetune int8 t={threshold:g} | {kl(reference, logprobs(model, windows)):.3e} | "
                         f"{model_bytes(model) / 2**20:.2f} | yes |")
        # Like for like with bitsandbytes: bytetune on the same layers, experts left fp32.
        model = copy.deepcopy(fp32)
        quantize_model(model, threshold=6.0, skip=("experts",))
        lines.append(f"| {name} | bytetune int8 t=6 (attention only) | {kl(reference, logprobs(model, windows)):.3e} | "
                     f"{model_bytes(model) / 2**20:.2f} | no (fp32) |")
        if importlib.util.find_spec("bitsandbytes") is not None:
            try:
                model = bnb_variant(copy.deepcopy(fp32))
                lines.append(f"| {name} | bitsandbytes Linear8bitLt t=6 (attention only) | "
                             f"{kl(reference, logprobs(model, windows)):.3e} | {model_bytes(model) / 2**20:.2f} | no (fp32) |")
            except Exception as error:  # noqa: BLE001 - a row of the report
                lines.append(f"| {name} | bitsandbytes | did not run: {type(error).__name__}: {str(error).splitlines()[0][:100]} | | |")
        else:
            lines.append(f"| {name} | bitsandbytes | not installed | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
