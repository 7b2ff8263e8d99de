"""CPU time of one LoRA training step on e2e.py's small shape, in this process only.

A config-built BLOOM model (hidden 256, 4 layers, vocab 4096, random weights), Int8Linear base
(bytetune.quantize_model, threshold 6), PEFT LoRA r=16 on every block linear, AdamW8bit, the
trainer's fused summed token loss; batch 2 x 128 tokens, 2 warm-up steps then 3 timed ones.
Prints wall and process CPU seconds per step: on a shared machine the CPU time is the steadier
of the two, since it leaves out the time other processes held the cores. Measures whichever
bytetune is importable, so the same command compares two trees:

    python bench/lora_step_cpu.py
    PYTHONPATH=/path/to/other/tree python bench/lora_step_cpu.py
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BloomConfig

from bytetune.optim import AdamW8bit
from bytetune.quant_layers import quantize_model
from bytetune.quant_layers.lora import prepare_for_kbit_training, register_int8_lora
from bytetune.trainer.loss import summed_token_loss


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=256, n_layer=4, n_head=8, vocab_size=4096))
    quantize_model(model, threshold=6.0, skip=("lm_head",))
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    lora = register_int8_lora(
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW8bit(params, lr=1e-4)
    ids = torch.randint(0, 4096, (2, 128), generator=torch.Generator().manual_seed(0))

    def step():
        summed, count = summed_token_loss(model, {"input_ids": ids, "labels": ids}, fused=True)
        (summed / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(3):
        step()
    print(f"per step: wall {(time.perf_counter() - wall) / 3:.2f} s, process CPU {(time.process_time() - cpu) / 3:.2f} s")


if __name__ == "__main__":
    main()
