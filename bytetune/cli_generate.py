"""``python -m bytetune.generate recipe=NAME [adapter=DIR] prompt="..." [max_new_tokens=N]``
(installed as bytetune-generate): see what a fine-tune changed. Loads the recipe's base exactly as
training did (int8 / ZeroQuant layers included) through the loaders and, by default, the adapter
the recipe's run wrote (``<output_dir>/adapter``); the prompting is bytetune.loaders.generation."""

from __future__ import annotations

from pathlib import Path

from bytetune.loaders.generation import before_and_after, complete, load_adapter_for
from bytetune.loaders.models import build_base
from bytetune.recipe import DEFAULT_RECIPE, RecipeError, load_recipe, parse_overrides

USAGE = """usage: python -m bytetune.generate recipe=NAME prompt="..." [adapter=DIR] [max_new_tokens=N] [key.sub=value ...]

Greedy completions of the prompt from the recipe's quantized base, then with the adapter
(default: the adapter/ folder the recipe's run wrote, <output_dir>/adapter; adapter=none: base only).
Other key=value arguments override the recipe, as for train.py."""


def main(argv: list[str]) -> int:
    """The command line; raises RecipeError (one line) for anything a user can get wrong."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    options = {"prompt": None, "adapter": None, "max_new_tokens": "32"}
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in options:
            options[key] = value
        else:
            rest.append(arg)
    if not options["prompt"]:
        raise RecipeError('give the text to complete: prompt="..."')
    if not options["max_new_tokens"].isdigit() or int(options["max_new_tokens"]) < 1:
        raise RecipeError(f"max_new_tokens must be a positive integer, got {options['max_new_tokens']!r}")
    recipe, overrides = parse_overrides(rest)
    cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides)
    adapter = options["adapter"] or str(Path(cfg.output_dir) / "adapter")
    if options["adapter"] is None and not Path(adapter).is_dir():
        raise RecipeError(f"no adapter at {adapter!r} (run train.py with this recipe first, or give adapter=DIR or adapter=none)")
    model, tokenizer = build_base(cfg)
    max_new = int(options["max_new_tokens"])
    if adapter == "none":
        complete(model, tokenizer, options["prompt"], max_new, stream=True, data_cfg=cfg.data)
        return 0
    # an instruction fine-tune is prompted as its training prompts were (chat template)
    before_and_after(load_adapter_for(model, adapter), tokenizer, options["prompt"], max_new, stream=True,
                     data_cfg=cfg.data)
    return 0
