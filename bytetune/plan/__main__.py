"""usage: python -m bytetune.plan recipe=NAME gpus=8x24GiB [parallel=fsdp|pipeline] [nodes=N]
                                 [gpu=KIND] [link=pcie4|pcie5|nvlink|NGB/s] [efficiency=F]
                                 [key.sub=value ...] [json=PATH]
       (installed as bytetune-plan)

Prints the memory plan of a recipe on the given devices (a table, or JSON with json=-), its device
map and the minimum number of devices of that size. Nothing is downloaded or loaded: the model is
built on the meta device from its bundled config. ``gpus=`` takes COUNTxSIZE (8x24GiB, 2x80GB);
``cpu=24GiB`` plans a CPU run. Other arguments override the recipe (training.seq_len=512);
``training.micro_batch=N`` is accepted for ``training.micro_batch_size=N``. ``parallel=fsdp``
plans FSDP2 (one process per GPU, each holding a shard; the recipe's ``parallel.strategy`` otherwise)
and ``nodes=N`` N machines with the given GPUs each (FSDP2 only). ``parallel=pipeline`` plans a
pipeline (one process per GPU, each a stage of contiguous blocks) and prints, beside its per-stage
table, the modelled throughput of device_map, pipeline and FSDP2 on those GPUs: ``gpu=`` the kind
(rtx3090, rtx4090, a10, a100, l40, h100, h100-pcie; default rtx4090), ``link=`` the bandwidth
between GPUs (default pcie4, 25 GB/s), ``efficiency=`` the fraction of the bf16 peak reached
(default 0.4); giving any of them adds the comparison to other plans too (docs/parallelism.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bytetune.plan.devices import check_usable, parse_devices
from bytetune.plan.placement import plan_memory
from bytetune.recipe.bundled import bundled_model_config, seq_len_error
from bytetune.recipe.schema import RecipeConfig, RecipeError, load_recipe, parse_overrides, sections_help

ALIASES = {"training.micro_batch": "training.micro_batch_size"}


def main(argv: list[str]) -> int:
    devices = None
    json_out = None
    parallel = None
    nodes = 1
    model_args: dict = {}
    rest = []
    seen: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key in ("-h", "--help"):
            print(__doc__ + "\n" + sections_help(RecipeConfig, "train.py"))
            return 0
        if not sep:
            print(f"error: argument {arg!r} is not key=value; see python -m bytetune.plan --help", file=sys.stderr)
            return 2
        # the planner's own options, given twice, would silently keep the last one
        option = "gpus/cpu" if key in ("gpus", "cpu") else key
        if key in ("gpus", "cpu", "json", "parallel", "nodes"):
            if option in seen:
                what = "the devices once (gpus=COUNTxSIZE or cpu=SIZE)" if option == "gpus/cpu" else f"{key}= once"
                print(f"error: {seen[option]} and {arg} both given: give {what}", file=sys.stderr)
                return 2
            seen[option] = arg
        if key == "gpus":
            devices = value
        elif key == "cpu":
            devices = f"cpu:{value}"
        elif key == "json":
            json_out = value
        elif key == "parallel":
            parallel = value
        elif key in ("gpu", "link"):
            model_args[key] = value
        elif key == "efficiency":
            try:
                model_args[key] = float(value)
            except ValueError:
                model_args[key] = None
            if model_args[key] is None or not 0 < model_args[key] <= 1:
                print(f"error: efficiency={value!r}: give the fraction of the GPU's peak reached, e.g. "
                      "efficiency=0.4", file=sys.stderr)
                return 2
        elif key == "nodes":
            if not value.isdigit() or int(value) < 1:
                print(f"error: nodes={value!r}: give the number of machines, e.g. nodes=2", file=sys.stderr)
                return 2
            nodes = int(value)
        else:
            rest.append(f"{ALIASES.get(key, key)}={value}")
    if devices is None:
        print("error: give the devices: gpus=COUNTxSIZE (e.g. gpus=8x24GiB) or cpu=SIZE", file=sys.stderr)
        return 2
    try:
        check_json_target(json_out)  # before the plan is computed, not after
        recipe_name, overrides = parse_overrides(rest)
        if recipe_name is None:
            raise RecipeError("give recipe=NAME (a file in recipes/) or recipe=path.yaml")
        recipe = load_recipe(recipe_name, overrides, check_paths=False)  # nothing is loaded
        if recipe.model.config_file:  # the planned model is its bundled config: it bounds seq_len
            too_long = seq_len_error(bundled_model_config(recipe.model.config_file), recipe.training.seq_len,
                                     model=f"model.config_file={recipe.model.config_file!r}")
            if too_long:
                raise RecipeError(too_long)
        plan = plan_memory(recipe, check_usable(parse_devices(devices), devices), parallel=parallel, nodes=nodes,
                           throughput=None, **model_args)
    except (RecipeError, ValueError, FileNotFoundError, OverflowError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if json_out == "-":
        print(json.dumps(plan.as_dict(), indent=1))
    else:
        print(plan.table())
        if plan.device_map:
            print("\nStages (one process per GPU):" if plan.parallel == "pipeline" else "\nDevice map:")
            for device, units in _grouped_map(plan).items():
                print(f"  {device}: {units}")
        if json_out:
            try:
                Path(json_out).write_text(json.dumps(plan.as_dict(), indent=1))
            except OSError as error:
                print(f"error: json={json_out}: could not write it ({error.strerror or error}): give a writable path, "
                      "or json=- to print the JSON", file=sys.stderr)
                return 2
            print(f"\nJSON written to {json_out}")
    return 0 if plan.fits else 1


def check_json_target(json_out: str | None) -> None:
    """``json=PATH`` names a file that can be written: its folder exists (it is not created, so a
    mistyped folder is caught) and it is not a folder itself."""
    if json_out is None or json_out == "-":
        return
    if not json_out:
        raise RecipeError("json= is empty: give json=PATH to write the plan to a file, or json=- to print it")
    target = Path(json_out).expanduser()
    if target.is_dir():
        raise RecipeError(f"json={json_out} is a folder: give a file path inside it, e.g. json={target / 'plan.json'}")
    if not target.parent.is_dir():
        raise RecipeError(f"json={json_out}: the folder {str(target.parent)!r} does not exist: create it first "
                          "(the planner does not), or json=- to print the JSON")


def _grouped_map(plan) -> dict[str, str]:
    """Device -> its modules, with runs of consecutive blocks shortened to first..last."""
    grouped: dict[str, list[str]] = {}
    for name, device in plan.device_map.items():
        grouped.setdefault(str(device), []).append(name)
    out = {}
    for device, names in grouped.items():
        blocks = [n for n in names if n.rsplit(".", 1)[-1].isdigit()]
        others = [n for n in names if n not in blocks]
        text = ", ".join(others)
        if blocks:
            span = blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]} ({len(blocks)} blocks)"
            text = f"{text}, {span}" if text else span
        out[device] = text
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
