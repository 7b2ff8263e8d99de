"""Fine-tune with a recipe: ``accelerate launch train.py recipe=NAME [key.sub=value ...]``.

``recipe`` is a name in recipes/ or a path to a YAML file (default: smollm2_lora8). Overrides are
checked against the schema (bytetune/recipe/schema.py) before anything loads. ``--print-config``
prints the resolved recipe and exits. Errors in the recipe, data or checkpoint print one line.
"""

from __future__ import annotations

import json
import sys

DEFAULT_RECIPE = "smollm2_lora8"


def main(argv: list[str]) -> int:
    from bytetune.recipe.schema import RecipeError, load_recipe, parse_overrides, to_yaml

    print_only = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    try:
        recipe, overrides = parse_overrides(args)
        cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides)
        if print_only:
            print(to_yaml(cfg), end="")
            return 0
        from bytetune.trainer.trainer import Trainer

        trainer = Trainer.from_config(cfg)
        summary = trainer.train()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
