"""Quality of LLM.int8() layers on the default real model (SmolLM2-135M-Instruct).

On held-out local text (stdlib source the model was not tuned on here), for each variant:
perplexity, and the mean over tokens of KL(p_fp32 || p_variant) of the next-token distribution.
Variants: fp32 (the reference), bytetune Int8Linear at threshold 6.0 and 0 (pure vector-wise),
and bitsandbytes' Linear8bitLt at threshold 6.0 when bitsandbytes is installed. Every variant
quantizes the same layers: all linear layers except the (tied) output head. Two more rows add
row-wise int8 word embeddings and (tied) head (quantize_embeddings, recipe switch
``quantization.embeddings: int8``): alone on the fp32 model (the KL they add by themselves) and on
top of Int8Linear t=6 (what the bloom recipes run).

    python bench/int8_quality.py                    # CPU: 2048 tokens
    python bench/int8_quality.py --tokens 16384     # CUDA: more text
    python bench/int8_quality.py --out bench/results/int8_quality_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import platform
import sys
import time
import warnings

import torch
from torch import nn

from bytetune import quantize_model
from bytetune.quant_layers.convert import default_skip_names, model_bytes
from bytetune.quant_layers.int8_embedding import quantize_embeddings
from bytetune.loaders.local_text import stdlib_text
from bytetune.loaders.models import load_smollm2


def heldout_windows(tokenizer, n_tokens: int, window: int) -> torch.Tensor:
    """[n_windows, window] token ids from the start of the held-out split."""
    text = stdlib_text("heldout", max_chars=n_tokens * 8)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = min(n_tokens, ids.numel()) // window
    if n_windows == 0:
        raise ValueError(f"held-out text gave {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n_windows * window].view(n_windows, window)


@torch.no_grad()
def next_token_logprobs(model: nn.Module, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[n_windows, window - 1, vocab] float32 log-probabilities of each next token."""
    out = []
    for row in windows:
        logits = model(input_ids=row[None].to(device)).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.stack(out)


def perplexity(logprobs: torch.Tensor, windows: torch.Tensor) -> float:
    targets = windows[:, 1:]
    nll = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
    return math.exp(nll.mean().item())


def mean_kl(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other)."""
    kl = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)
    return kl.mean().item()


def bitsandbytes_int8(model: nn.Module, threshold: float, device: torch.device) -> nn.Module:
    """The same layers as quantize_model, as bitsandbytes Linear8bitLt (frozen int8 weights)."""
    import bitsandbytes as bnb

    # It warns on every call that fp32 inputs are cast to fp16 (part of what is being measured).
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    skipped = default_skip_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skipped]
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=threshold,
        )
        layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        model.set_submodule(name, layer.to(device))  # moving the weight to a device quantizes it
    # Eval mode matters: in training mode bitsandbytes' CPU path (MatMul8bitFp) dequantizes the
    # weight and runs a float matmul, i.e. it does not quantize activations at all.
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="held-out tokens (default 2048 CPU, 16384 CUDA)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_tokens = args.tokens or (16384 if device.type == "cuda" else 2048)
    torch.manual_seed(0)

    start = time.perf_counter()
    fp32_model, tokenizer = load_smollm2(torch.float32)
    fp32_model.eval()
    load_s = time.perf_counter() - start
    windows = heldout_windows(tokenizer, n_tokens, args.window)

    def evaluate(model, name):
        model.to(device)
        t0 = time.perf_counter()
        logprobs = next_token_logprobs(model, windows, device)
        secs = time.perf_counter() - t0
        print(f"evaluated {name} in {secs:.1f} s", flush=True)
        return logprobs, secs

    ref_logprobs, ref_s = evaluate(fp32_model, "fp32")
    rows = [("fp32", perplexity(ref_logprobs, windows), 0.0, model_bytes(fp32_model), ref_s)]
    fp32_model.cpu()

    for threshold in (6.0, 0.0):
        model = copy.deepcopy(fp32_model)
        report = quantize_model(model, threshold=threshold)
        logprobs, secs = evaluate(model, f"t={threshold:g}")
        rows.append(
            (f"bytetune Int8Linear t={threshold:g}", perplexity(logprobs, windows), mean_kl(ref_logprobs, logprobs),
             report.bytes_after, secs)
        )
        del model

    for name, linears in (("fp32 + int8 embeddings/head", False), ("bytetune Int8Linear t=6 + int8 embeddings/head", True)):
        model = copy.deepcopy(fp32_model)
        if linears:
            quantize_model(model, threshold=6.0)
        quantize_embeddings(model)
        logprobs, secs = evaluate(model, name)
        rows.append((name, perplexity(logprobs, windows), mean_kl(ref_logprobs, logprobs), model_bytes(model), secs))
        del model

    if importlib.util.find_spec("bitsandbytes") is not None:
        model = bitsandbytes_int8(copy.deepcopy(fp32_model), 6.0, device)
        logprobs, secs = evaluate(model, "bitsandbytes")
        rows.append(
            ("bitsandbytes Linear8bitLt t=6", perplexity(logprobs, windows), mean_kl(ref_logprobs, logprobs),
             model_bytes(model), secs)
        )
        del model
    else:
        print("bitsandbytes not installed: its row is skipped")

    ref_ppl = rows[0][1]
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), held-out stdlib text: "
        f"{windows.numel()} tokens in {windows.shape[0]} windows of {args.window}; device {device.type} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}); model load {load_s:.0f} s.",
        "",
        "| variant | perplexity | ppl / fp32 | mean KL vs fp32 (nats/token) | KL / ours t=6 | model MiB | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    ours_kl = rows[1][2]
    for name, ppl, kl, nbytes, secs in rows:
        kl_ratio = "-" if name == "fp32" else f"{kl / ours_kl:.2f}"
        lines.append(
            f"| {name} | {ppl:.4f} | {ppl / ref_ppl:.4f} | {kl:.5f} | {kl_ratio} | {nbytes / 2**20:.1f} | {secs:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# int8 quality: bytetune Int8Linear vs fp32 and bitsandbytes\n\n"
                f"Printed by `python {' '.join(sys.argv)}`.\n\n"
                + table
                + "\n"
            )


if __name__ == "__main__":
    main()
