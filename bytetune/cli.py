"""The command-line entry points: ``train.py`` / ``bytetune-train``, ``bytetune-plan`` and
``python -m bytetune.lkd`` / ``bytetune-lkd`` (bytetune/cli_lkd.py) and ``python -m bytetune.generate`` /
``bytetune-generate`` (bytetune/cli_generate.py). Each prints its usage and the schema's sections for
``--help`` and turns whatever a user can get wrong into one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import sys

from bytetune.recipe import (
    DEFAULT_RECIPE,
    RecipeConfig,
    RecipeError,
    available_recipes,
    load_recipe,
    parse_overrides,
    sections_help,
    to_yaml,
)

HELP_FLAGS = ("-h", "--help")

TRAIN_USAGE = f"""\
usage: train.py [recipe=NAME_OR_PATH] [section.key=value ...] [--print-config]
       (installed as bytetune-train; several processes: accelerate launch train.py ...)

Fine-tune LoRA adapters on a frozen quantized base, as a recipe says. recipe= is a shipped recipe
({', '.join(available_recipes())}; default {DEFAULT_RECIPE}) or a path to a YAML file; each
section.key=value overrides one value (training.max_steps=10, optimizer.lr=1e-4). Every value is
checked before the model loads. --print-config prints the resolved recipe and exits.
"""


INTERRUPTED_STATUS = 130  # 128 + SIGINT: what shells report for a process ended by Ctrl-C


def error_exit(error: BaseException, status: int = 2) -> int:
    """One ``error:`` line on stderr and the exit status of a user error."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return status


def train_main(argv: list[str] | None = None) -> int:
    """``train.py recipe=NAME [key.sub=value ...] [--print-config]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in argv):
        print(TRAIN_USAGE + "\n" + sections_help(RecipeConfig, "train.py"))
        return 0
    print_only = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    try:
        recipe, overrides = parse_overrides(args)
        cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides)
        if print_only:
            print(to_yaml(cfg), end="")
            return 0
        # The trainer pulls in accelerate, peft and datasets: a bad recipe fails before that.
        from bytetune.trainer import pipeline
        from bytetune.trainer.trainer import Trainer, TrainingError

        try:
            # one pipeline stage per process (bytetune/trainer/pipeline.py), else the one trainer
            trainer = (pipeline.PipelineTrainer if pipeline.use_pipeline(cfg) else Trainer).from_config(cfg)
            summary = trainer.train()
        except TrainingError as error:  # TrainingInterrupted (Ctrl-C during training) exits 130
            return error_exit(error, error.exit_status)
    except RecipeError as error:  # DataError and CheckpointError are RecipeErrors too
        return error_exit(error)
    except KeyboardInterrupt:  # before training started: nothing of the run was written yet
        return error_exit(RuntimeError("interrupted (Ctrl-C) before training started: nothing was written"),
                          INTERRUPTED_STATUS)
    except OSError as error:  # a read or write the trainer does not wrap itself (one line all the same)
        return error_exit(RuntimeError(f"{error.filename or 'a file'}: {error.strerror or error}"))
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
        sample = summary.get("held_out_sample")
        if sample:
            print(f"\nheld-out prompt: {sample['prompt']!r}\n  base:    {sample['before']!r}\n  adapted: {sample['after']!r}")
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    """``bytetune-plan recipe=NAME gpus=COUNTxSIZE [key.sub=value ...]`` (bytetune.plan)."""
    from bytetune.plan.__main__ import main

    try:
        return main(sys.argv[1:] if argv is None else argv)
    except RecipeError as error:
        return error_exit(error)


def lkd_main(argv: list[str] | None = None) -> int:
    """``bytetune-lkd [recipe=NAME] [key.sub=value ...]`` (bytetune/cli_lkd.py)."""
    # LKD loads models and data (transformers, datasets): import it only when asked to run.
    from bytetune.cli_lkd import main

    try:
        return main(sys.argv[1:] if argv is None else argv)
    except RecipeError as error:  # DataError too
        return error_exit(error)


def generate_main(argv: list[str] | None = None) -> int:
    """``bytetune-generate recipe=NAME prompt="..." [adapter=DIR]`` (bytetune/cli_generate.py)."""
    # generate loads models (transformers, peft): import it only when asked to run.
    from bytetune.cli_generate import main

    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except RecipeError as error:
        return error_exit(error)
