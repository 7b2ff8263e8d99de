"""More user mistakes through the real entry points (issue 18): data rows, the model a recipe
builds, the planner's devices and files, bytetune.generate and bytetune-lkd. Each ends in exit
status 2, exactly one ``error:`` line naming the key or file, and no traceback.

Cases marked ``before_load`` must fail before any model loads: the loader is replaced by one that
fails the test if it is called. Several cases were accepted by the code before issue 18 (they
trained something other than what was asked, or printed "fits"); they are marked "was accepted".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from bytetune.cli import generate_main, lkd_main, plan_main, train_main
from bytetune.loaders import models
from tests.test_bad_inputs import _tiny

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # the schema's default data.template
# A CUDA index this machine does not have, whatever it has: the same verdict on every host.
MISSING_GPU = f"cuda:{torch.cuda.device_count()}"
LONG_PROMPTS = ["Name the three largest moons of Jupiter, in order.", "Write a haiku about an old pond and a frog."]


def _byte_tokenizer_dir(directory: Path, **specials: str) -> Path:
    """A byte-level tokenizer with only the given special tokens (none: no eos, pad, bos)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(list(specials.values()) + alphabet)}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(directory)
    return directory


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _files(t: Path) -> dict[str, Path]:
    pair = {"prompt": "Say hi.", "response": "Hi!"}
    files = {
        # line 7 has no response: trained as the text "None" before issue 18
        "no_response": _write_jsonl(t / "no_response.jsonl", [pair] * 6 + [{"prompt": "Say bye."}] + [pair] * 3),
        "null_response": _write_jsonl(t / "null_response.jsonl", [pair, pair, {"prompt": "x", "response": None}] + [pair] * 6),
        "number_text": _write_jsonl(t / "number_text.jsonl", [{"text": "fine"}, {"text": 42}]),
        "bad_json": _write_jsonl(t / "bad_json.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}, '{"text": "d",']),
        "list_row": _write_jsonl(t / "list_row.jsonl", [{"text": "a"}, ["not", "an", "object"]]),
        "json_array": t / "array.json",
        "latin1": t / "latin1.txt",
        "latin1_jsonl": t / "latin1.jsonl",
        "empty_txt": t / "empty.txt",
        "blank_jsonl": t / "blank.jsonl",
        "int_parquet": t / "ints.parquet",
        "null_parquet": t / "nulls.parquet",
        "fake_parquet": t / "fake.parquet",
        "long_prompts": _write_jsonl(t / "long.jsonl", [{"prompt": p, "response": "ok"} for p in LONG_PROMPTS]),
        "pairs": _write_jsonl(t / "pairs.jsonl", [pair] * 8),
        "model_dir": t / "gpt2_config",
        "empty_dir": t / "empty_dir",
        "from_config_path": t / "from_config_path.yaml",
        "no_specials_tokenizer": t / "tok_no_specials",
    }
    files["json_array"].write_text(json.dumps([pair, {"response": "no prompt"}]))
    files["latin1"].write_bytes("first line\nsecond line caf\xe9\n".encode("latin-1"))
    files["latin1_jsonl"].write_bytes('{"text": "ok"}\n{"text": "\xe9t\xe9"}\n'.encode("latin-1"))
    files["empty_txt"].write_text("")
    files["blank_jsonl"].write_text("\n  \n")
    pq.write_table(pa.table({"text": [1, 2, 3]}), files["int_parquet"])
    pq.write_table(pa.table({"text": ["a", None, "c"]}), files["null_parquet"])
    files["fake_parquet"].write_text("this is not parquet\n")
    # a GPT-2 directory with a config and no weights: a seq_len check that passes would go on to
    # "could not load model", so the error below shows it came from the config alone
    files["model_dir"].mkdir()
    (files["model_dir"] / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 300}))
    files["empty_dir"].mkdir()
    files["from_config_path"].write_text(
        (REPO / "recipes" / "tiny_lora8.yaml").read_text().replace("name_or_path: tiny-bloom", f"name_or_path: {files['model_dir']}"))
    _byte_tokenizer_dir(files["no_specials_tokenizer"])
    return files


def _prompt_tokens(prompt: str) -> int:
    """Tokens of a prompt under the byte tokenizer (one per UTF-8 byte) and the default template."""
    return len(TEMPLATE.format(prompt=prompt).encode("utf-8"))


def _instr(t, f, name, *extra):
    """Instruction data; seq_len long enough for the template and a short pair to train."""
    return _tiny(t, "data.format=instruction", f"data.train={f[name]}", "data.eval=null", "training.seq_len=64", *extra)


# (entry point, argv from (tmp_path, files), words the error line must contain, fails before any model loads)
BAD_INPUTS = [
    # --- data rows, each naming the file, the line (or row) and the field
    ("train", lambda t, f: _instr(t, f, "no_response"), ["no_response.jsonl", "line 7", "no field 'response'", "data.response_field"], True),  # was accepted
    ("train", lambda t, f: _instr(t, f, "null_response"), ["null_response.jsonl", "line 3", "field 'response' is null"], True),  # was accepted
    ("train", lambda t, f: _tiny(t, f"data.train={f['number_text']}"), ["number_text.jsonl", "line 2", "field 'text' is a number"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['bad_json']}"), ["bad_json.jsonl", "line 4", "invalid JSON"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['list_row']}"), ["list_row.jsonl", "line 2", "must be a JSON object"], True),
    ("train", lambda t, f: _instr(t, f, "json_array"), ["array.json", "row 2", "no field 'prompt'", "data.prompt_field"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['latin1']}"), ["latin1.txt", "line 2", "not UTF-8"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['latin1_jsonl']}"), ["latin1.jsonl", "line 2", "not UTF-8"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['empty_txt']}"), ["empty.txt", "is empty"], True),
    ("train", lambda t, f: _instr(t, f, "latin1"), ["latin1.txt", "is plain text", "data.format=instruction"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['blank_jsonl']}"), ["blank.jsonl", "is empty"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['int_parquet']}"), ["ints.parquet", "field 'text' holds int64", "data.text_field"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['null_parquet']}"), ["nulls.parquet", "row 2", "field 'text' is null"], True),
    ("train", lambda t, f: _tiny(t, f"data.train={f['fake_parquet']}"), ["fake.parquet", "could not be read as parquet"], True),
    ("train", lambda t, f: _tiny(t, f"data.eval={f['bad_json']}"), ["data.eval file", "bad_json.jsonl", "line 4"], True),
    ("train", lambda t, f: _tiny(t, "data.format=instruction", f"data.train={f['pairs']}"), ["data.eval=stdlib", "data.format=text", "!data.train"], True),
    # the value of seq_len that would fit, not "lower training.seq_len"
    ("train", lambda t, f: _instr(t, f, "long_prompts", "training.seq_len=24"),
     ["training.seq_len=24", f"raise training.seq_len to at least {min(map(_prompt_tokens, LONG_PROMPTS)) + 1}"], False),
    ("train", lambda t, f: _tiny(t, "training.seq_len=1"), ["training.seq_len=1 leaves no target tokens"], True),  # was accepted
    ("train", lambda t, f: _tiny(t, f"model.tokenizer={f['no_specials_tokenizer']}"), ["neither an eos nor a pad", "model.tokenizer"], False),  # was an IndexError
    # --- the model the recipe builds
    ("train", lambda t, f: _tiny(t, f"model.name_or_path={f['model_dir']}"), ["model.from_config=false", "gpt2_config"], True),  # was accepted
    ("train", lambda t, f: _tiny(t, f"recipe={f['from_config_path']}"),
     ["is a path but model.from_config=true", "model.from_config=false"], True),
    ("train", lambda t, f: _tiny(t, "model.config_file=smollm2-135m", "model.shrink.num_layers=1", "model.shrink.hidden_size=64",
                                 "model.shrink.num_heads=4", "model.shrink.vocab_size=512", "training.seq_len=9000"),
     ["training.seq_len=9000", "max_position_embeddings=8192"], True),  # was accepted where it fit in memory
    ("train", lambda t, f: _tiny(t, "model.from_config=false", f"model.name_or_path={f['model_dir']}"),
     ["training.seq_len=32", "gpt2_config", "=16"], True),
    ("train", lambda t, f: _tiny(t, "lora.target_modules=[q_proj]"), ["'q_proj' matches no module", "query_key_value"], True),
    ("train", lambda t, f: _tiny(t, "lora.target_modules=[input_layernorm]"), ["'input_layernorm'", "LayerNorm", "LoRA cannot adapt"], True),
    ("train", lambda t, f: _tiny(t, "lora.layers=[5]"), ["lora.layers=[5]", "2 blocks"], True),
    ("train", lambda t, f: _tiny(t, "lora.target_modules=[dense]", "lora.layers=[0,7]"), ["lora.layers=[0, 7]", "2 blocks"], True),
    ("train", lambda t, f: _tiny(t, f"model.device_map={MISSING_GPU}"), [f"model.device_map='{MISSING_GPU}'"], True),  # was accepted
    ("train", lambda t, f: _tiny(t, "model.device_map=gpu0"), ["model.device_map='gpu0' is not valid"], True),
    # --- the planner
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8x0GiB"], ["8x0GiB", "finite memory size > 0"], True),  # was accepted
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=0x24GiB"], ["0x24GiB", "at least 1"], True),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8xlotsGiB"], ["'lots' is not a number"], True),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8xinfGiB"], ["8xinfGiB", "finite memory size > 0"], True),
    ("plan", lambda t, f: ["recipe=tiny_lora8", "cpu=8GiB", f"json={t / 'no' / 'such' / 'plan.json'}"], ["json=", "does not exist", "json=-"], True),
    ("plan", lambda t, f: ["recipe=tiny_lora8", "cpu=8GiB", f"json={f['empty_dir']}"], ["is a folder"], True),
    ("plan", lambda t, f: ["recipe=smollm2_lora8", "gpus=1x80GiB", "training.seq_len=10000"], ["training.seq_len=10000", "max_position_embeddings=8192"], True),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8x24GiB", "training.seq_len=1"], ["training.seq_len=1"], True),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=1x1B"], ["'1x1B'", "no more than the runtime alone takes"], True),  # was "fits" per device
    ("plan", lambda t, f: ["recipe=tiny_lora8", "gpus=1x24GiB", "cpu=8GiB"], ["gpus=1x24GiB and cpu=8GiB both given"], True),  # was: the last one won
    # --- python -m bytetune.generate
    ("generate", lambda t, f: _tiny(t), ['prompt="..."'], True),
    ("generate", lambda t, f: _tiny(t, "prompt=hello", "max_new_tokens=0"), ["max_new_tokens must be a positive integer"], True),
    ("generate", lambda t, f: _tiny(t, "prompt=hello"), ["no adapter at", "adapter=DIR"], True),
    ("generate", lambda t, f: _tiny(t, "prompt=hello", f"adapter={f['empty_dir']}"), ["has no adapter_config.json"], False),
    ("generate", lambda t, f: _tiny(t, "prompt=hello", "adapter=none", f"model.device_map={MISSING_GPU}"), [f"model.device_map='{MISSING_GPU}'"], True),
    # --- bytetune-lkd
    ("lkd", lambda t, f: ["training.seq_len=0"], ["training.seq_len must be > 0"], True),
    ("lkd", lambda t, f: [f"lkd.device={MISSING_GPU}"], [f"lkd.device='{MISSING_GPU}'"], True),
    ("lkd", lambda t, f: ["model.name_or_path=tiny-bloom", "model.from_config=true", "model.config_file=tiny-bloom", "model.tokenizer=bytes",
                          f"data.train={f['bad_json']}", "training.seq_len=16", "lkd.n_batches=1", "lkd.batch_size=1",
                          f"lkd.output_dir={t / 'lkd'}"],
     ["bad_json.jsonl", "line 4", "invalid JSON"], False),
    ("lkd", lambda t, f: ["model.name_or_path=smollm2", "model.from_config=true", "model.config_file=smollm2-135m", "model.tokenizer=bytes",
                          "model.shrink.num_layers=1", "model.shrink.hidden_size=64", "model.shrink.num_heads=4", "model.shrink.vocab_size=512",
                          "lkd.random_tokens=true", "training.seq_len=9000", f"lkd.output_dir={t / 'lkd'}"],
     ["training.seq_len=9000", "max_position_embeddings=8192"], True),
]

ENTRY_POINTS = {"train": train_main, "plan": plan_main, "lkd": lkd_main, "generate": generate_main}


def _no_model_loads(*args, **kwargs):
    raise AssertionError("a model was loaded before the error")


@pytest.mark.parametrize("entry, make_argv, words, before_load", BAD_INPUTS,
                         ids=[f"{e}-{i}" for i, (e, _, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, entry, make_argv, words, before_load):
    argv = make_argv(tmp_path, _files(tmp_path))
    if before_load:  # the one loader every command calls (bytetune.loaders.models)
        monkeypatch.setattr(models, "load_base_model", _no_model_loads)
    code = ENTRY_POINTS[entry](argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    for word in words:  # "!word": the line must not name it
        assert (word[1:] not in error_lines[0]) if word.startswith("!") else (word in error_lines[0]), error_lines[0]


def test_there_are_at_least_twenty_five():
    assert len(BAD_INPUTS) >= 25


@pytest.mark.slow
def test_planner_process_prints_one_line(tmp_path):
    """As a user sees it: python -m bytetune.plan with a json= folder that does not exist."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bytetune.plan", "recipe=tiny_lora8", "cpu=8GiB",
                           f"json={tmp_path / 'missing' / 'plan.json'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "does not exist" in error_lines[0], done.stderr
    assert not (tmp_path / "missing").exists()  # said, not created


def test_tokenizer_without_eos_separates_documents_with_its_bos(tmp_path):
    """A tokenizer with a bos but no eos or pad: documents are joined by its bos id (stated in a
    warning), never by the None that became -2**63 in the batch before issue 18."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from bytetune.recipe.schema import DataConfig
    from bytetune.loaders.data import build_token_blocks

    tokenizer = AutoTokenizer.from_pretrained(_byte_tokenizer_dir(tmp_path / "tok", bos_token="<s>"))
    assert tokenizer.eos_token_id is None and tokenizer.pad_token_id is None
    documents = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    text = tmp_path / "docs.jsonl"
    _write_jsonl(text, [{"text": d} for d in documents])
    data = OmegaConf.structured(DataConfig(train=str(text), eval=None, cache_dir=None))
    with pytest.warns(UserWarning, match="bos_token '<s>'"):
        blocks = build_token_blocks(data, tokenizer, seq_len=8, role="train")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    stream = blocks.input_ids.flatten().tolist()
    assert min(stream) >= 0 and max(stream) < len(tokenizer)
    # the packed stream is the documents' bytes with the bos id after each, cut to whole blocks
    expected = []
    for document in documents:
        expected += tokenizer(document, add_special_tokens=False)["input_ids"] + [bos]
    assert stream == expected[: len(stream)] and len(stream) == len(expected) // 8 * 8


def test_lora_rank_above_a_layer_width_warns():
    """r above min(in, out) of a targeted layer cannot be reached: a warning names the layer."""
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from bytetune.loaders.models import check_lora_targets

    config = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    recipe_lora = type("Lora", (), {"r": 48, "target_modules": ["query_key_value"], "layers": None})()
    with pytest.warns(UserWarning, match=r"lora.r=48 is more than the width of 1 targeted layer.*32 in, 96 out"):
        check_lora_targets(model, LoraConfig(r=48, target_modules=["query_key_value"]), recipe_lora)
    recipe_lora.r = 16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r=16 fits every layer: nothing to say
        check_lora_targets(model, LoraConfig(r=16, target_modules=["query_key_value"]), recipe_lora)


def test_name_or_path_of_a_from_config_recipe():
    """Renaming the model of a from_config recipe is refused unless the override also says how the
    model is built (from_config / config_file): then the name is the built model's label."""
    from bytetune.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="add model.from_config=false"):
        load_recipe("tiny_lora8", {"model.name_or_path": "some-org/some-model"})  # the Python API's form
    relabelled = load_recipe("tiny_lora8", ["model.name_or_path=tiny-llama", "model.config_file=smollm2-135m"])
    assert relabelled.model.from_config and relabelled.model.name_or_path == "tiny-llama"
    kept = load_recipe("tiny_lora8", ["model.name_or_path=my-label", "model.from_config=true"])
    assert kept.model.config_file == "tiny-bloom" and kept.model.name_or_path == "my-label"
