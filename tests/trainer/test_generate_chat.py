"""Trainer.generate prompts an instruction fine-tune the way its training data did: through the
tokenizer's chat template (or data.template), not as raw text it never saw."""

from __future__ import annotations

import json

import pytest

from bytetune.loaders.models import byte_tokenizer
from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

# A template of its own (offline): role tags around each turn, the assistant's tag to answer.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "name a colour"


def test_generate_applies_the_chat_template_the_training_data_used(tmp_path, monkeypatch):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"prompt": PROMPT if i == 0 else f"count to {i}", "response": "blue " * (i + 1)}) + "\n"
                            for i in range(8)))
    trainer = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{
        "model.tokenizer": str(tmp_path / "tokenizer"), "data.format": "instruction", "data.train": str(rows),
        "data.eval": None, "training.seq_len": 48, "training.grad_accum_steps": 1, "training.max_steps": 2}))
    templated = trainer.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
    # what training saw: some row starts with exactly the templated prompt, with no loss on it
    starts = [row[: len(templated)].tolist() for row in trainer.train_data.input_ids]
    assert list(templated) in starts

    seen = []
    model = trainer.unwrapped
    original = model.generate

    def record(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", record)
    trainer.generate(PROMPT, max_new_tokens=2)
    assert seen[-1] == list(templated)
    trainer.generate(PROMPT, max_new_tokens=2, adapter=False)  # the base is asked the same way
    assert seen[-1] == list(templated)
    trainer.generate(PROMPT, max_new_tokens=2, raw=True)
    assert seen[-1] == trainer.tokenizer(PROMPT)["input_ids"]
    # a run whose data did not use the chat template is prompted through data.template instead
    trainer.cfg.data.chat_template = False
    trainer.generate(PROMPT, max_new_tokens=2)
    plain = trainer.cfg.data.template.format(prompt=PROMPT)
    assert seen[-1] == trainer.tokenizer(plain, add_special_tokens=False)["input_ids"]
