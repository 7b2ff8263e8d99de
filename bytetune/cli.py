"""The command-line entry points: ``train.py`` / ``bytetune-train``, ``bytetune-plan`` and
``python -m bytetune.lkd``. Each turns what a user can get wrong into one ``error:`` line."""

from __future__ import annotations

import json
import sys

from bytetune.recipe import RecipeError, load_recipe, parse_overrides, to_yaml

DEFAULT_RECIPE = "smollm2_lora8"


def train_main(argv: list[str] | None = None) -> int:
    """``train.py recipe=NAME [key.sub=value ...] [--print-config]``."""
    argv = sys.argv[1:] if argv is None else argv
    print_only = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    try:
        recipe, overrides = parse_overrides(args)
        cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides)
        if print_only:
            print(to_yaml(cfg), end="")
            return 0
        # The trainer pulls in accelerate, peft and datasets: a bad recipe fails before that.
        from bytetune.trainer.trainer import Trainer

        trainer = Trainer.from_config(cfg)
        summary = trainer.train()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
        sample = summary.get("held_out_sample")
        if sample:
            print(f"\nheld-out prompt: {sample['prompt']!r}\n  base:    {sample['before']!r}\n  adapted: {sample['after']!r}")
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    from bytetune.plan.__main__ import main

    return main(sys.argv[1:] if argv is None else argv)


def lkd_main(argv: list[str] | None = None) -> int:
    from bytetune.trainer.lkd_run import main

    main(sys.argv[1:] if argv is None else argv)
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    from bytetune.trainer.generate import main

    return main(sys.argv[1:] if argv is None else argv)
