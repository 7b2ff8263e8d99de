"""The README and docs/ stay true: their cheap commands run (every --help and --print-config
line, the planner lines), the README's Python example trains and generates on a tiny local model,
its recipe table matches bytetune/recipe/recipes/*.yaml, every link resolves (file and heading)
and every repository path they name exists."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from bytetune import cli
from bytetune.recipe import RECIPES_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_RECIPE = "smollm2_lora8"  # what `make train` and `recipe=` without a name run


def page_text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ------------------------------------------------------------------------------ commands
# The command lines users type, as the pages write them: fenced shell blocks (with `\`
# continuations) and inline code spans, trailing `# comments` dropped.
COMMAND = re.compile(
    r"^(?:python -m bytetune\.(?:plan|lkd|generate)|bytetune-(?:train|plan|lkd|generate)|python train\.py)(?:\s|$)"
)
# Placeholders the pages use for "fill in your own": such a line is a form, not a command.
PLACEHOLDER = re.compile(r"\.\.\.|\bNAME\b|\bKIND\b|\bRECIPE\b|<|\[|\|")
ENTRY_POINTS = {
    "python train.py": cli.train_main, "bytetune-train": cli.train_main,
    "python -m bytetune.plan": cli.plan_main, "bytetune-plan": cli.plan_main,
    "python -m bytetune.lkd": cli.lkd_main, "bytetune-lkd": cli.lkd_main,
    "python -m bytetune.generate": cli.generate_main, "bytetune-generate": cli.generate_main,
}


def command_lines(text: str) -> list[str]:
    fenced = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)
    lines = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    lines += re.findall(r"`([^`]+)`", prose)
    found = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).strip()
        if COMMAND.match(line):
            found.append(" ".join(line.split()))
    return found


def is_cheap(command: str) -> bool:
    """--help and --print-config never load a model; the planner builds its model on the meta device."""
    if PLACEHOLDER.search(command):
        return False
    words = shlex.split(command)
    if "--help" in words or "--print-config" in words:
        return True
    return command.startswith(("python -m bytetune.plan ", "bytetune-plan ")) and any(w.startswith("gpus=") for w in words)


def cheap_commands() -> list[tuple[str, str]]:
    """(page, command) for each distinct invocation (``bytetune-plan X`` is ``python -m bytetune.plan X``)."""
    seen: dict[tuple, tuple[str, str]] = {}
    for page in PAGES:
        for command in command_lines(page_text(page)):
            if is_cheap(command):
                entry, argv = split_entry(command)
                seen.setdefault((entry.__name__, tuple(argv)), (rel(page), command))
    return sorted(seen.values())


def split_entry(command: str):
    for prefix, entry in ENTRY_POINTS.items():
        if command == prefix or command.startswith(prefix + " "):
            return entry, shlex.split(command[len(prefix):])
    raise AssertionError(f"no entry point for {command!r}")


def test_the_pages_hold_the_cheap_commands_this_test_runs():
    # The extraction can fail: the README's own quick-start lines must be found and kept.
    commands = [command for _, command in cheap_commands()]
    assert "python train.py --help" in commands
    assert "python -m bytetune.plan recipe=bloom_lora8 gpus=8x24GiB" in commands
    assert not is_cheap("python -m bytetune.plan recipe=NAME gpus=8x24GiB")
    assert not is_cheap('python -m bytetune.generate recipe=smollm2_lora8 prompt="x"')


@pytest.mark.parametrize("page,command", cheap_commands(), ids=lambda value: value)
def test_documented_command_runs(page, command, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the pages' commands run from the repository root
    entry, argv = split_entry(command)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = entry(argv)
        except SystemExit as stop:  # argparse's --help
            status = stop.code
    status = 0 if status is None else status
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert not errors, f"{page}: `{command}` -> {errors}"
    # a plan that does not fit exits 1 (its verdict, not a failure of the command)
    allowed = (0, 1) if entry is cli.plan_main and "--help" not in argv else (0,)
    assert status in allowed, f"{page}: `{command}` exited {status}\n{err.getvalue()[-2000:]}"
    assert out.getvalue().strip(), f"{page}: `{command}` printed nothing"


# ------------------------------------------------------------------ the README's Python example
def readme_python_example() -> str:
    section = page_text(README).split("## Fine-tune a local model on instruction data, in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def byte_tokenizer_with_chat_template():
    """A byte-level tokenizer built offline (4 specials + 256 bytes) with a chat template of its own."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({symbol: len(specials) + i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


@pytest.mark.usefixtures("one_thread")
def test_readme_python_example_trains_and_generates_on_a_local_model(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    code = readme_python_example()
    model_dir, data_file = re.findall(r'"model\.name_or_path": "([^"]+)"', code), re.findall(r'"data\.train": "([^"]+)"', code)
    assert len(model_dir) == 1 and len(data_file) == 1, "the example names one model directory and one data file"
    tokenizer = byte_tokenizer_with_chat_template()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / model_dir[0])
    tokenizer.save_pretrained(tmp_path / model_dir[0])
    rows = [{"prompt": f"Name colour number {i}.", "response": "blue " * (i % 5 + 1)} for i in range(40)]
    (tmp_path / data_file[0]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / data_file[0]).write_text("".join(json.dumps(row) + "\n" for row in rows))

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python example)", "exec"), namespace)
    trainer, summary = namespace["trainer"], namespace["summary"]
    assert summary["steps"] == 20
    output_dir = Path(trainer.cfg.output_dir)
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 3, printed  # the loss line and the two completions
    logged = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    first_loss = next(entry["loss"] for entry in logged if "loss" in entry)
    assert summary["final_train_loss"] < first_loss - 0.5, (first_loss, summary["final_train_loss"])
    adapted = trainer.generate("Name a colour.", max_new_tokens=8)
    base = trainer.generate("Name a colour.", max_new_tokens=8, adapter=False)
    assert adapted != base


# --------------------------------------------------------------------------- the recipe table
def readme_recipe_rows() -> dict[str, list[str]]:
    section = page_text(README).split("## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.match(r"`([\w.-]+)`", cells[0]) if line.startswith("|") else None
        if name:
            rows[name.group(1)] = cells
    return rows


def base_of(recipe) -> str:
    q = recipe.quantization
    if q.get("zeroquant"):
        return "ZeroQuant W4/8"  # ZeroQuantConfig's default split: attention INT8, MLP INT4
    return "LLM.int8()" if q.int8 else "float"


def placement_of(recipe) -> str:
    strategy = recipe.get("parallel", {}).get("strategy", "none") if recipe.get("parallel") else "none"
    if strategy == "fsdp":
        return "FSDP2"
    if strategy == "pipeline":
        return "pipeline"
    return "device map" if recipe.model.get("device_map") == "auto" else "one device"


def test_readme_recipe_table_matches_the_recipe_files():
    rows = readme_recipe_rows()
    files = sorted(path.stem for path in Path(RECIPES_DIR).glob("*.yaml"))
    assert sorted(rows) == files, "the README's recipe table and bytetune/recipe/recipes/*.yaml differ"
    for name, cells in rows.items():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert cells[1] == f"`{recipe.model.name_or_path}`", f"{name}: model column"
        assert cells[2] == base_of(recipe), f"{name}: base column"
        assert cells[3] == placement_of(recipe), f"{name}: placement column"
        assert ("(default)" in cells[0]) == (name == DEFAULT_RECIPE), f"{name}: default marker"


# ------------------------------------------------------------------------- links and paths
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page_text(page), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def test_github_anchor_rule():
    assert github_anchor("Compiling for every GPU generation without one: `make gpu-compile`") == \
        "compiling-for-every-gpu-generation-without-one-make-gpu-compile"
    assert github_anchor("Fine-tune a local model on instruction data, in Python") == \
        "fine-tune-a-local-model-on-instruction-data-in-python"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(page_text(page)):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{rel(page)}: broken links {broken}"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(page_text(README))}
    assert not [rel(p) for p in PAGES[1:] if p.resolve() not in linked]


# A repository path: a top folder of this repository, then path characters; placeholders
# (`<version>`, `step-N`) are forms, globs must match something.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:bytetune|bench|tests|docs|recipes|\.ci)/[\w./*-]*[\w*/])")


def named_paths(text: str) -> set[str]:
    found = set()
    for match in REPO_PATH.finditer(text):
        path = match.group(1)
        end = match.end(1)
        if "<" in text[end:end + 2]:  # a form: gpu_compile_triton-<version>.md
            continue
        found.add(path.rstrip("/."))
    return found


def test_named_paths_exist():
    missing = []
    for page in PAGES:
        for path in sorted(named_paths(page_text(page))):
            matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
            if not matches:
                missing.append(f"{rel(page)}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_path_finder_finds_paths():
    text = "see `bench/results/e2e_cpu.md`, bytetune/kernels/ and (docs/validation.md); `gpu_compile_triton-<v>.md`"
    assert named_paths(text) == {"bench/results/e2e_cpu.md", "bytetune/kernels", "docs/validation.md"}


# A dotted name of the package (`bytetune.quant_layers.lora.lora_config`): its modules exist and the
# first name past them is written in that module (or the package's __init__.py).
DOTTED = re.compile(r"(?<![\w./-])(bytetune(?:\.\w+)+)")


def dotted_name_resolves(name: str) -> bool:
    parts = name.split(".")
    path, index = ROOT / "bytetune", 1
    while index < len(parts) and (path / parts[index]).is_dir():
        path, index = path / parts[index], index + 1
    if index < len(parts) and (path / f"{parts[index]}.py").is_file():
        source, index = path / f"{parts[index]}.py", index + 1
    else:
        source = path / "__init__.py"
    rest = parts[index:]
    return not rest or re.search(rf"\b{rest[0]}\b", source.read_text(encoding="utf-8")) is not None


def test_named_modules_exist():
    missing = [f"{rel(page)}: {name}" for page in PAGES for name in sorted(set(DOTTED.findall(page_text(page))))
               if not dotted_name_resolves(name)]
    assert not missing, "modules named in the docs that do not exist:\n" + "\n".join(missing)
    assert not dotted_name_resolves("bytetune.quant_layers.no_such_module_here")
