"""ZeroQuant perplexity table on the default real model (SmolLM2-135M, offline).

Rows: FP32; LLM.int8() (bytetune Int8Linear); W8A8 group-wise; W4/8-A8 (ZeroQuant's default);
W4/8-A16 without and with LKD. Every row sees the same held-out tokens (stdlib_text("heldout"),
code the calibration text does not contain). Prints a markdown table, the share of the W4/8-A16
perplexity gap that LKD recovers, and the bytes per parameter of the W4/8 model.

    OMP_NUM_THREADS=1 python bench/zeroquant_ppl.py            # CPU, a few minutes per LKD run
    python bench/zeroquant_ppl.py --device cuda                 # GPU
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from bytetune.quant_layers.lkd import LKDConfig, run_lkd
from bytetune.cli_lkd import load_model, parse_cli
from bytetune.loaders.data import text_batches
from bytetune.quant_layers import quantize_model
from bytetune.quant_layers.zeroquant import quantize_model_zeroquant, quantized_weight_bytes_per_param
from bytetune.loaders.local_text import stdlib_text

ALL_8_BITS = {r".": 8}
ROWS = ("fp32", "int8", "w8a8", "w48a8", "w48a16", "lkd")


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens."""
    windows = token_ids[: token_ids.numel() // seq_len * seq_len].reshape(-1, seq_len)
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--lkd-steps", type=int, default=LKDConfig.steps)
    parser.add_argument("--lkd-lr", type=float, default=LKDConfig.lr)
    parser.add_argument("--lkd-weight-lr", type=float, default=LKDConfig.weight_lr)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--calib-batch-size", type=int, default=2)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    if wanted - set(ROWS):
        raise SystemExit(f"unknown rows {sorted(wanted - set(ROWS))}; choose from {ROWS}")

    t0 = time.perf_counter()
    # LKD's defaults (SmolLM2 and the stdlib training split), the stdlib cut to what calibration reads
    lkd_run = parse_cli([f"lkd.device={args.device}", "data.max_train_chars=null"])
    fp_model, tokenizer = load_model(lkd_run)
    fp_model.eval().to(args.device)
    heldout = torch.tensor(tokenizer(stdlib_text("heldout", max_chars=args.eval_tokens * 8))["input_ids"])
    heldout = heldout[: args.eval_tokens]
    if heldout.numel() < args.eval_tokens:
        raise SystemExit(f"only {heldout.numel()} held-out tokens available")
    print(f"# model loaded in {time.perf_counter() - t0:.0f} s; {heldout.numel()} held-out tokens, windows of {args.seq_len}")

    def evaluate(model) -> float:
        return perplexity(model, heldout, args.seq_len, batch_size=2)

    rows: list[tuple[str, float, str]] = []

    def record(name: str, model, note: str = "") -> float:
        start = time.perf_counter()
        ppl = evaluate(model)
        rows.append((name, ppl, note))
        print(f"# {name}: ppl {ppl:.3f} ({time.perf_counter() - start:.0f} s eval) {note}", flush=True)
        return ppl

    fp_ppl = w48_ppl = lkd_ppl = bytes_per_param = reports = None
    if "fp32" in wanted:
        fp_ppl = record("FP32", fp_model)

    if "int8" in wanted:
        model = copy.deepcopy(fp_model)
        quantize_model(model, threshold=6.0)
        record("Int8 (LLM.int8(), threshold 6.0)", model)
        del model

    if "w8a8" in wanted:
        model = copy.deepcopy(fp_model)
        quantize_model_zeroquant(model, module_bits=ALL_8_BITS, group_size=args.group_size, act_bits=8)
        record(f"W8A8 group-wise (g={args.group_size})", model)
        del model

    if "w48a8" in wanted:
        model = copy.deepcopy(fp_model)
        quantize_model_zeroquant(model, group_size=args.group_size, act_bits=8)
        record("W4/8-A8 (ZeroQuant default, no LKD)", model)
        del model

    if "w48a16" in wanted:
        model = copy.deepcopy(fp_model)
        quantize_model_zeroquant(model, group_size=args.group_size, act_bits=16)
        w48_ppl = record("W4/8-A16 (no LKD)", model)
        bytes_per_param = quantized_weight_bytes_per_param(model)
        del model

    if "lkd" in wanted:
        reports = lkd_row(args, lkd_run, fp_model, tokenizer, record)
        lkd_ppl = rows[-1][1]

    print_summary(args, heldout, rows, fp_ppl, w48_ppl, lkd_ppl, bytes_per_param, reports)


def lkd_row(args, lkd_run, fp_model, tokenizer, record):
    model = copy.deepcopy(fp_model)
    # Rows spread over the stdlib training split, packed as `python -m bytetune.lkd` reads them.
    batches = text_batches(lkd_run.data, tokenizer, args.calib_batches, args.calib_batch_size, args.calib_seq_len)
    batches = [b.to(args.device) for b in batches]
    config = LKDConfig(
        group_size=args.group_size, act_bits=16, steps=args.lkd_steps, lr=args.lkd_lr, weight_lr=args.lkd_weight_lr
    )
    start = time.perf_counter()
    reports = run_lkd(model, batches, config, log=lambda s: print("#", s, flush=True))
    lkd_seconds = time.perf_counter() - start
    calib_tokens = sum(b.numel() for b in batches)
    what = "scales" if args.lkd_weight_lr == 0 else f"scales (lr {args.lkd_lr}) + weights (lr {args.lkd_weight_lr}, STE)"
    record(
        "W4/8-A16 + LKD",
        model,
        f"{args.lkd_steps} Adam steps/layer on {what}, {calib_tokens} stdlib train tokens, {lkd_seconds:.0f} s",
    )
    return reports


def print_summary(args, heldout, rows, fp_ppl, w48_ppl, lkd_ppl, bytes_per_param, reports) -> None:
    print()
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32), {heldout.numel()} held-out stdlib tokens, "
          f"windows of {args.seq_len}, group size {args.group_size}, device {args.device}")
    print()
    print("| model | perplexity | vs FP32 | note |")
    print("|---|---:|---:|---|")
    for name, ppl, note in rows:
        ratio = f"{ppl / fp_ppl:.3f}x" if fp_ppl else "-"
        print(f"| {name} | {ppl:.3f} | {ratio} | {note} |")
    print()
    if reports:
        mse_gain = sum(r.mse_after for r in reports) / max(sum(r.mse_before for r in reports), 1e-30)
        print(f"summed layer-output MSE on the calibration tokens, after / before LKD: {mse_gain:.3f}")
    if fp_ppl and w48_ppl and lkd_ppl:
        gap = w48_ppl - fp_ppl
        recovered = (w48_ppl - lkd_ppl) / gap if gap > 0 else float("nan")
        print(f"LKD recovers {recovered:.1%} of the W4/8-A16 perplexity gap ({w48_ppl:.3f} -> {lkd_ppl:.3f}, FP32 {fp_ppl:.3f})")
    if bytes_per_param:
        print(
            f"W4/8 bytes per parameter: {bytes_per_param['quantized_linear']:.3f} in the quantized linear layers "
            f"(codes + fp32 group scales), {bytes_per_param['whole_model']:.3f} for the whole model "
            f"(fp32 embeddings/norms; {bytes_per_param['quantized_fraction']:.1%} of parameters quantized)"
        )


if __name__ == "__main__":
    main()
