"""Peak memory of one training step, plain vs fused cross-entropy (and int8 embeddings/head).

Each case runs in its own subprocess: the recipe's PEFT model is built (random weights from the
bundled config, byte tokenizer, nothing downloaded), the peak-RSS counter is reset
(``/proc/self/clear_refs`` <- 5 resets VmHWM), one forward + backward of ``summed_token_loss`` runs
on one sequence, and the step's peak is VmHWM minus the RSS before the step. RSS is what the OS
gave the process (glibc may keep freed blocks), the honest CPU measure of a step's footprint.

Cases: SmolLM2-135M (Llama, 49,152 vocab, tied) at seq_len 2048; BLOOM shrunk to 2 blocks of
hidden 256 with its real 250,880 vocabulary (tied) at seq_len 1024 (bloom_lora8's).

    python bench/fused_ce_memory.py --out bench/results/fused_ce_memory_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

CASES = {
    "smollm2": dict(recipe="smollm2_lora8", seq_len=2048, overrides={
        "model.from_config": True, "model.config_file": "smollm2-135m", "model.tokenizer": "bytes",
    }),
    "bloom-shrunk": dict(recipe="bloom_lora8", seq_len=1024, overrides={
        "model.from_config": True, "model.config_file": "bloom", "model.tokenizer": "bytes", "model.device_map": None,
        "model.dtype": "float32", "quantization.int8": False, "model.shrink.num_layers": 2,
        "model.shrink.hidden_size": 256, "model.shrink.num_heads": 4,
    }),
}
VARIANTS = {
    "plain": {"training.fused_cross_entropy": False, "quantization.embeddings": None},
    "fused": {"training.fused_cross_entropy": True, "quantization.embeddings": None},
    "fused + int8 emb/head": {"training.fused_cross_entropy": True, "quantization.embeddings": "int8"},
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def run_case(case: str, variant: str, checkpointing: bool) -> dict:
    """One step in this process; returns the measurements."""
    import torch

    from bytetune.quant_layers.convert import model_bytes
    from bytetune.recipe import load_recipe
    from bytetune.trainer.loss import summed_token_loss
    from bytetune.trainer.trainer import build_model

    spec = CASES[case]
    overrides = {**spec["overrides"], **VARIANTS[variant], "training.seq_len": spec["seq_len"],
                 "training.precision": "fp32", "lora.dropout": 0.0}
    cfg = load_recipe(spec["recipe"], overrides)
    model, _ = build_model(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, spec["seq_len"]), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS: model building is not part of the step
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    summed, count = summed_token_loss(model, batch, fused=cfg.training.fused_cross_entropy)
    (summed / count).backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "case": case, "variant": variant, "checkpointing": checkpointing, "vocab": vocab,
        "hidden": model.get_base_model().config.hidden_size, "tokens": spec["seq_len"],
        "loss": (summed / count).item(), "model_mib": model_bytes(model) / 2**20,
        "rss_before_mib": before / 1024, "step_peak_mib": (peak - before) / 1024, "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    checkpointing = not args.no_checkpointing
    if args.one:
        print(json.dumps(run_case(args.one[0], args.one[1], checkpointing)))
        return

    rows = []
    for case in args.case or list(CASES):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--one", case, variant] + (["--no-checkpointing"] if not checkpointing else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{case} / {variant} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)

    lines = [
        f"One training step (forward + backward of the summed loss, LoRA adapters, fp32, batch 1, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}), random weights from the bundled configs; "
        f"{platform.machine()} CPU, shared machine (2 cores, other jobs running); "
        "step peak = peak RSS during the step minus RSS before it.",
        "",
        "| model | vocab | hidden | tokens | variant | model MiB | step peak MiB | vs plain | [tokens, vocab] fp32 MiB | loss | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain_peak = {}
    for row in rows:
        if row["variant"] == "plain":
            plain_peak[row["case"]] = row["step_peak_mib"]
        ratio = row["step_peak_mib"] / plain_peak[row["case"]] if row["case"] in plain_peak else float("nan")
        logits_mib = row["tokens"] * row["vocab"] * 4 / 2**20
        lines.append(
            f"| {row['case']} | {row['vocab']} | {row['hidden']} | {row['tokens']} | {row['variant']} | "
            f"{row['model_mib']:.0f} | {row['step_peak_mib']:.0f} | {ratio:.2f} | {logits_mib:.0f} | "
            f"{row['loss']:.4f} | {row['step_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as out:
            out.write(f"# Fused cross-entropy: peak memory of a training step ({time.strftime('%Y-%m-%d')})\n\n"
                      f"Printed by `python {' '.join(sys.argv)}`.\n\n{table}\n")


if __name__ == "__main__":
    main()
