"""Prompting a loaded model as its fine-tune was trained: the adapter loaded onto its base, the
prompt in the form training gave prompts, greedy completions with and without the adapter
(streamed token by token when asked). ``python -m bytetune.generate`` (bytetune/cli_generate.py)
and ``Trainer.generate`` both use these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TextStreamer

from bytetune.quant_layers.group_lora import load_zeroquant_adapter
from bytetune.recipe import RecipeError


def load_adapter_for(model, adapter_dir: str | Path) -> PeftModel:
    """``model`` with the LoRA adapter saved in ``adapter_dir``; one clear error when the directory
    holds no adapter or the adapter was trained on another base (other layers or shapes)."""
    adapter_dir = Path(adapter_dir).expanduser()
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise RecipeError(f"adapter {str(adapter_dir)!r} has no adapter_config.json: give the adapter/ folder a run wrote")
    base_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    try:
        # registers bytetune's LoRA layers for Int8Linear and GroupQuantLinear bases alike
        return load_zeroquant_adapter(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:
        raise RecipeError(
            f"adapter {str(adapter_dir)!r} does not fit this base model (it was trained on {base_name!r}): "
            f"{str(error).splitlines()[0][:200]}"
        ) from None


def prompt_input_ids(tokenizer, prompt: str, data_cfg=None) -> list[int]:
    """The token ids a prompt is given to the model as. With the ``data`` section of a run that
    trained on instruction data, the prompt takes the form training gave its prompts: the
    tokenizer's chat template (a user turn and the assistant's opening) when it has one and
    data.chat_template is on, else data.template; otherwise the plain text."""
    if data_cfg is not None and data_cfg.format == "instruction":
        if data_cfg.chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            return list(ids)
        return list(tokenizer(data_cfg.template.format(prompt=prompt), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32, stream: bool = False, data_cfg=None) -> str:
    """The greedy continuation of ``prompt`` (new text only); printed as it is generated when
    ``stream``. ``data_cfg``: the run's ``data`` section, to prompt as training did
    (:func:`prompt_input_ids`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_input_ids(tokenizer, prompt, data_cfg)], device=device)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    if was_training:
        model.train()
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def before_and_after(peft_model: PeftModel, tokenizer, prompt: str, max_new_tokens: int = 32, stream: bool = False,
                     data_cfg=None) -> dict:
    """{"before": the base's completion, "after": the adapted model's} for one prompt."""
    if stream:
        print("--- base model:", flush=True)
    with peft_model.disable_adapter():
        before = complete(peft_model, tokenizer, prompt, max_new_tokens, stream, data_cfg)
    if stream:
        print("--- with the adapter:", flush=True)
    after = complete(peft_model, tokenizer, prompt, max_new_tokens, stream, data_cfg)
    return {"prompt": prompt, "before": before, "after": after}
