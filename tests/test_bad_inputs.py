"""Everything a user can get wrong on the command line ends as one ``error:`` line naming the
problem, a non-zero exit, and no traceback: run through the real entry points (train.py's
``train_main``, the planner's ``plan_main``, LKD's ``lkd_main``), and twice as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bytetune.cli import lkd_main, plan_main, train_main

REPO = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    """recipe=tiny_lora8 writing under tmp_path, then the bad values."""
    return [
        "recipe=tiny_lora8",
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "logging.progress_bar=false",
        "logging.plot=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _files(tmp_path: Path) -> dict[str, Path]:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ntraining:\n  seq_len: [1, 2\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- just\n- a list\n")
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"body": "a row without the text field"}\n' * 4)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    return {"broken": broken, "list": listed, "no_text": no_text, "csv": csv, "empty_dir": empty_dir}


# (entry point, argv built from tmp_path and the files above, words the error line must contain)
BAD_INPUTS = [
    # the command line itself
    ("train", lambda t, f: ["recipe=tiny_lora8", "justaword"], ["'justaword' is not key=value"]),
    ("train", lambda t, f: ["recipe=no_such_recipe"], ["unknown recipe 'no_such_recipe'", "tiny_lora8"]),
    ("train", lambda t, f: [f"recipe={t}/missing.yaml"], ["missing.yaml' does not exist"]),
    ("train", lambda t, f: [f"recipe={f['broken']}"], ["bad YAML in recipe", "broken.yaml"]),
    ("train", lambda t, f: [f"recipe={f['list']}"], ["top level must be a mapping"]),
    # unknown keys and wrong types
    ("train", lambda t, f: _tiny(t, "training.max_stepz=3"), ["unknown key 'training.max_stepz'", "max_steps"]),
    ("train", lambda t, f: _tiny(t, "training.max_steps=abc"), ["wrong type for 'training.max_steps'"]),
    ("train", lambda t, f: _tiny(t, "lora.r=[1,2]"), ["wrong type for 'lora.r'"]),
    # ranges and choices, all before the model loads
    ("train", lambda t, f: _tiny(t, "quantization.threshold=-3"), ["quantization.threshold must be >= 0", "-3"]),
    ("train", lambda t, f: _tiny(t, "lora.dropout=1.0"), ["lora.dropout must be in [0.0, 1.0)"]),
    ("train", lambda t, f: _tiny(t, "optimizer.lr=nan"), ["optimizer.lr must be a finite number"]),
    ("train", lambda t, f: _tiny(t, "optimizer.lr=0"), ["optimizer.lr must be > 0"]),
    ("train", lambda t, f: _tiny(t, "optimizer.betas=[0.9,1.5]"), ["optimizer.betas[1] must be in [0.0, 1.0)"]),
    ("train", lambda t, f: _tiny(t, "optimizer.name=adam9bit"), ["optimizer.name='adam9bit'", "adamw8bit"]),
    ("train", lambda t, f: _tiny(t, "training.precision=fp8"), ["training.precision='fp8'", "bf16"]),
    ("train", lambda t, f: _tiny(t, "schedule.warmup_steps=50"), ["schedule.warmup_steps=50", "training.max_steps=8"]),
    ("train", lambda t, f: _tiny(t, "quantization.zeroquant=true"), ["int8 and quantization.zeroquant are both true"]),
    ("train", lambda t, f: _tiny(t, "data.format=instruction"), ["stdlib is plain text", "data.format=text"]),
    ("train", lambda t, f: _tiny(t, "lora.layers=[-1]"), ["lora.layers must be null"]),
    ("train", lambda t, f: _tiny(t, "model.config_file=gpt9"), ["model.config_file='gpt9' is not bundled"]),
    # local paths
    ("train", lambda t, f: _tiny(t, "data.train=/no/such/train.jsonl"), ["data.train file '/no/such/train.jsonl' does not exist"]),
    ("train", lambda t, f: _tiny(t, f"data.eval={f['csv']}"), ["unsupported type", ".parquet"]),
    ("train", lambda t, f: _tiny(t, "model.from_config=false", "model.name_or_path=./no/such/model"),
     ["model.name_or_path='./no/such/model' does not exist"]),
    ("train", lambda t, f: _tiny(t, "model.from_config=false", f"model.name_or_path={f['empty_dir']}", "model.gguf_file=x.gguf"),
     ["model.gguf_file='x.gguf' is not in", "model.gguf_file=null"]),
    ("train", lambda t, f: _tiny(t, "checkpoint.resume=/no/such/checkpoint"), ["checkpoint.resume='/no/such/checkpoint' is not a directory"]),
    # failures found while running: CheckpointError, model loading, DataError, TrainingError
    ("train", lambda t, f: _tiny(t, "checkpoint.resume=latest"), ["checkpoint.resume=latest: no checkpoint in"]),
    ("train", lambda t, f: _tiny(t, f"checkpoint.resume={f['empty_dir']}"), ["is not a checkpoint directory"]),
    ("train", lambda t, f: _tiny(t, "model.from_config=false", f"model.name_or_path={f['empty_dir']}"),
     ["could not load model", "empty_model"]),
    ("train", lambda t, f: _tiny(t, f"data.train={f['no_text']}"), ["no field 'text'", "data.text_field"]),
    ("train", lambda t, f: _tiny(t, "optimizer.lr=1e30", "optimizer.name=adamw", "training.max_nonfinite_steps=0",
                                 "training.max_steps=4", "schedule.warmup_steps=0", "data.eval=null"),
     ["non-finite losses", "lower optimizer.lr"]),
    # the planner
    ("plan", lambda t, f: ["recipe=bloom_lora8"], ["give the devices"]),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=banana"], ["banana"]),
    ("plan", lambda t, f: ["gpus=8x24GiB"], ["give recipe=NAME"]),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8x24GiB", "training.seq_len=-1"], ["training.seq_len must be > 0"]),
    ("plan", lambda t, f: ["recipe=bloom_lora8", "gpus=8x24GiB", "lora.rank=3"], ["unknown key 'lora.rank'"]),
    # LKD
    ("lkd", lambda t, f: ["lkd.stepz=3"], ["unknown key 'lkd.stepz'"]),
    ("lkd", lambda t, f: ["quantization.act_bits=5"], ["quantization.act_bits must be 8 or 16"]),
    ("lkd", lambda t, f: ["lkd.device=tpu9"], ["lkd.device='tpu9'"]),
    ("lkd", lambda t, f: [f"recipe={f['broken']}"], ["bad YAML"]),
    ("lkd", lambda t, f: [f"model.name_or_path={f['empty_dir']}", "model.gguf_file=null", f"lkd.output_dir={t / 'out'}",
                          "lkd.random_tokens=true"],
     ["could not load model"]),
]

ENTRY_POINTS = {"train": train_main, "plan": plan_main, "lkd": lkd_main}


@pytest.mark.parametrize("entry, make_argv, words", BAD_INPUTS, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_error_line(tmp_path, capsys, entry, make_argv, words):
    argv = make_argv(tmp_path, _files(tmp_path))
    code = ENTRY_POINTS[entry](argv)
    err = capsys.readouterr().err
    assert code != 0
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in error_lines[0], error_lines[0]


def test_there_are_at_least_twenty():
    assert len(BAD_INPUTS) >= 20


def _train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_py_process_prints_no_traceback(tmp_path):
    """A data error found after the model loaded, as a user sees it (each process start costs
    seconds of imports, so the value errors are checked in-process above)."""
    files = _files(tmp_path)
    done = _train_py(*_tiny(tmp_path, f"data.train={files['no_text']}"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "no field 'text'" in error_lines[0], done.stderr


def test_train_help_prints_usage_and_sections(capsys):
    for flag in ("--help", "-h"):
        assert train_main(["recipe=tiny_lora8", flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: train.py")
        for section in ("model", "quantization", "lora", "data", "optimizer", "schedule", "training", "checkpoint"):
            assert f"\n  {section} " in out
        assert "--print-config" in out


@pytest.mark.parametrize("entry, first_line", [(plan_main, "usage: python -m bytetune.plan"), (lkd_main, "usage: python -m bytetune.lkd")])
def test_help_of_planner_and_lkd(capsys, entry, first_line):
    assert entry(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(first_line) and "Sections" in out and "\n  model " in out
