"""Run folders, checkpoint files and interruptions, through the real entry point (train.py's
``train_main``, and once as a process for Ctrl-C): each mistake or broken file ends in one
``error:`` line and exit status 2 (130 for Ctrl-C), no traceback, and no checkpoint lost; a
checkpoint file damaged in any way is named, and a run resumed from the previous intact
checkpoint ends bitwise equal to the run that was never interrupted."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bytetune.cli import train_main
from bytetune.trainer import checkpoint as ckpt
from tests.trainer.helpers import with_stalled_checkpoint_write

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 steps of one 4 x 32 micro-batch, checkpoints at steps 2 and 4 (both kept), no held-out data.
FAST = ["training.max_steps=4", "training.grad_accum_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
        "eval.at_start=false", "data.eval=null", "logging.progress_bar=false", "logging.plot=false",
        "logging.tensorboard=false"]


def tiny(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["recipe=tiny_lora8", f"output_dir={run_dir}", f"data.cache_dir={cache}", *FAST, *extra]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = train_main(argv)
    return code, capsys.readouterr().err


def digest(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["adapter_sha256_per_rank"][0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted 4-step run (checkpoints step-2 and step-4): the reference every resumed
    run must end bitwise equal to; each test works on a copy."""
    root = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(tiny(root / "run", root / "cache")) == 0
    finally:
        torch.set_num_threads(threads)
    run = root / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    return {"run": run, "cache": root / "cache", "digest": digest(run)}


@pytest.fixture
def used(finished, tmp_path):
    """A copy of the finished run's folder, and the shared data cache."""
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    return run, finished["cache"]


def intact_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the run folder
def test_fresh_run_into_a_used_folder_is_refused(used, capsys):
    run, cache = used
    before = intact_files(run)
    code, err = run_cli(capsys, tiny(run, cache))
    line = one_error_line(err)
    assert code == 2
    assert "holds an earlier run of this recipe (checkpoints up to step-00000004)" in line
    assert "checkpoint.resume=latest" in line and "checkpoint.overwrite=true" in line
    assert intact_files(run) == before


def test_fresh_run_of_another_recipe_into_a_used_folder_is_refused(used, capsys):
    run, cache = used
    code, err = run_cli(capsys, tiny(run, cache, "training.seed=7"))
    assert code == 2 and "holds another run" in one_error_line(err)


def test_resume_under_another_recipe_is_refused(used, capsys):
    run, cache = used
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest", "lora.r=8"))
    line = one_error_line(err)
    assert code == 2 and "belongs to another run" in line and "lora.r (4 there, 8 here)" in line


def test_a_reused_folder_never_mixes_runs(used, capsys):
    """Another run into a used folder, told to overwrite: only its own checkpoints and log are
    left, and resuming hands back its adapter. Before run folders were checked, the fresh run
    appended to the old log and left the old run's step-4 checkpoint as the latest, so that
    resuming handed back the old adapter."""
    run, cache = used
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    other = ["training.seed=7", "training.max_steps=2"]
    code, err = run_cli(capsys, tiny(run, cache, *other))
    assert code == 2 and "holds another run" in one_error_line(err)  # refused without overwrite
    assert train_main(tiny(run, cache, *other, "checkpoint.overwrite=true")) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    new_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert new_adapter != old_adapter
    # resuming the latest checkpoint continues the new run (its recipe), never the old one
    assert train_main(tiny(run, cache, *other, "training.max_steps=4", "checkpoint.resume=latest")) == 0
    assert json.loads((run / "summary.json").read_text())["steps_this_session"] == 2
    capsys.readouterr()
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest"))  # the old run's recipe
    assert code == 2 and "belongs to another run" in one_error_line(err)


def test_output_dir_that_is_a_file(tmp_path, finished, capsys):
    target = tmp_path / "run"
    target.write_text("not a folder")
    code, err = run_cli(capsys, tiny(target, finished["cache"]))
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    assert target.read_text() == "not a folder"


def test_output_dir_below_a_file(tmp_path, finished, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, err = run_cli(capsys, tiny(blocker / "run", finished["cache"]))
    line = one_error_line(err)
    assert code == 2 and "is a file, not a folder" in line and "blocker" in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: mode 555, or for root (who writes through modes) a
    read-only tmpfs mounted on it; skipped where neither is possible."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("running as root without mount: no way to make a folder read-only")
        mounted = True
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_read_only_output_dir(read_only_dir, finished, capsys):
    code, err = run_cli(capsys, tiny(read_only_dir / "run", finished["cache"]))
    line = one_error_line(err)
    assert code == 2 and "cannot write" in line and "output_dir you can write to" in line


# ------------------------------------------------------------------------- full disk mid-run
def test_no_space_during_a_checkpoint_keeps_the_previous_one_and_resumes_bitwise(tmp_path, finished, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk_at_step_4(obj, path, *args, **kwargs):
        if ".tmp-step-00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    code, err = run_cli(capsys, tiny(run, finished["cache"]))
    line = one_error_line(err)
    assert code == 2 and "no space left on the device" in line and "step-00000002 is intact" in line
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert ckpt.verify(ckpt.list_checkpoints(run)[0]) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-written left
    monkeypatch.setattr(torch, "save", real_save)
    assert train_main(tiny(run, finished["cache"], "checkpoint.resume=latest")) == 0
    assert digest(run) == finished["digest"]


def _pages(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_a_really_full_disk_mid_run_keeps_the_previous_checkpoint(tmp_path, finished, capsys):
    """A real tmpfs with room for the run's small files and one and a half checkpoints: the
    step-4 checkpoint cannot be written (safetensors and torch.save both write through the OS).
    Needs root (mount); the in-process ENOSPC test above covers the rest everywhere."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    step = ckpt.list_checkpoints(finished["run"])[0]
    size = 8 * 4096 + _pages(step) * 3 // 2  # recipe.yaml, run.json, log.jsonl and folders, then 1.5 checkpoints
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount is not allowed here")
    try:
        run = disk / "run"
        code, err = run_cli(capsys, tiny(run, finished["cache"]))
        line = one_error_line(err)
        assert code == 2 and "no space left on the device" in line and "step-00000002 is intact" in line
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
        assert ckpt.verify(run / "checkpoints" / "step-00000002") is None
        assert not list((run / "checkpoints").glob(".tmp-*"))
        kept = tmp_path / "kept"
        shutil.copytree(run, kept)  # to a disk with room, and resumed there
    finally:
        unmounted = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        if unmounted.returncode:  # never leave the mount behind, even when the test fails
            subprocess.run(["umount", "-l", str(disk)], check=False)
    assert unmounted.returncode == 0, f"the failed run left a file open on its disk: {unmounted.stderr}"
    assert train_main(tiny(kept, finished["cache"], "checkpoint.resume=latest")) == 0
    assert digest(kept) == finished["digest"]


def test_no_space_writing_the_adapter_keeps_the_old_adapter(used, capsys, monkeypatch):
    import peft.peft_model

    run, cache = used
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    real = peft.peft_model.safe_save_file

    def full_disk_for_the_adapter(tensors, filename, *args, **kwargs):
        if ".tmp-adapter" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk_for_the_adapter)
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.overwrite=true", "training.max_steps=2"))
    line = one_error_line(err)
    assert code == 2 and "no space left" in line and "writing the adapter" in line
    assert not (run / ".tmp-adapter").exists()
    # overwrite removed the old run, then the new run's step-2 checkpoint is whole
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert ckpt.verify(ckpt.list_checkpoints(run)[0]) is None
    assert not (run / "adapter").exists() or (run / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter


def test_read_only_log_is_one_line(used, capsys, monkeypatch):
    """A write the run makes every step (the log) failing mid-run: one line, checkpoints kept."""
    run, cache = used
    import bytetune.trainer.trainer as trainer_module

    def read_only(self, record):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.output_dir / "log.jsonl"))

    monkeypatch.setattr(trainer_module.Trainer, "_write_log", read_only)
    before = intact_files(run)
    code, err = run_cli(capsys, tiny(run, cache, f"checkpoint.resume={run}/checkpoints/step-00000002"))
    line = one_error_line(err)
    assert code == 2 and "cannot write" in line and "log.jsonl" in line
    assert intact_files(run) == before  # both checkpoints kept, byte for byte


# ------------------------------------------------------------------- damaged checkpoint files
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = [
    ("adapter_model.safetensors", truncate, "truncated"),
    ("optimizer.pt", truncate, "truncated"),
    ("scheduler.pt", flip_a_byte, "corrupt"),
    (ckpt.STATE_FILE, truncate, "unreadable or corrupt"),
    ("rng_rank0.pt", flip_a_byte, "corrupt"),
]


@pytest.mark.parametrize("name, damage, word", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_checkpoint_is_named_then_previous_intact_resumes_bitwise(used, finished, capsys, name, damage, word):
    run, cache = used
    latest = run / "checkpoints" / "step-00000004"
    damage(latest / name)
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest"))
    line = one_error_line(err)
    assert code == 2
    assert f"{name} is {word}" in line and "step-00000004" in line
    assert "checkpoint.resume=previous_intact" in line and "step-00000002" in line
    # told to, the run takes the previous intact checkpoint and ends where the straight run did
    with pytest.warns(UserWarning, match="skipped damaged checkpoints step-00000004"):
        assert train_main(tiny(run, cache, "checkpoint.resume=previous_intact")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_this_session"] == 2
    assert digest(run) == finished["digest"]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert ckpt.verify(latest) is None  # rewritten whole by the resumed run


def test_damaged_file_without_a_manifest_is_named_when_read(used, capsys):
    """A checkpoint of an older bytetune (no manifest): the file is named when it fails to load."""
    run, cache = used
    latest = run / "checkpoints" / "step-00000004"
    (latest / ckpt.MANIFEST_FILE).unlink()
    truncate(latest / "optimizer.pt")
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest"))
    line = one_error_line(err)
    assert code == 2 and "optimizer.pt cannot be read" in line and "previous_intact" in line


def test_missing_checkpoint_file(used, capsys):
    run, cache = used
    (run / "checkpoints" / "step-00000004" / "scheduler.pt").unlink()
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest"))
    assert code == 2 and "scheduler.pt is missing" in one_error_line(err)


def test_corrupt_manifest(used, capsys):
    run, cache = used
    (run / "checkpoints" / "step-00000004" / ckpt.MANIFEST_FILE).write_text("{not json")
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=latest"))
    assert code == 2 and "manifest.json is unreadable or corrupt" in one_error_line(err)


def test_damaged_checkpoint_given_by_path(used, capsys):
    run, cache = used
    latest = run / "checkpoints" / "step-00000004"
    truncate(latest / "adapter_model.safetensors")
    code, err = run_cli(capsys, tiny(run, cache, f"checkpoint.resume={latest}"))
    line = one_error_line(err)
    assert code == 2 and "adapter_model.safetensors is truncated" in line and "step-00000002" in line


def test_no_intact_checkpoint_left(used, capsys):
    run, cache = used
    for checkpoint in ckpt.list_checkpoints(run):
        truncate(checkpoint / "optimizer.pt")
    code, err = run_cli(capsys, tiny(run, cache, "checkpoint.resume=previous_intact"))
    line = one_error_line(err)
    assert code == 2 and "no intact checkpoint" in line and "checkpoint.overwrite=true" in line


def test_previous_intact_takes_the_latest_when_it_is_whole(used, capsys):
    run, cache = used
    assert train_main(tiny(run, cache, "checkpoint.resume=previous_intact", "training.max_steps=6")) == 0
    assert json.loads((run / "summary.json").read_text())["steps_this_session"] == 2


def test_truncated_log_line_is_dropped_on_resume(used, finished, capsys):
    """A kill mid-line leaves half a JSON record at the end of the log: resuming drops it."""
    run, cache = used
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    assert train_main(tiny(run, cache, f"checkpoint.resume={run}/checkpoints/step-00000002")) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert digest(run) == finished["digest"]


# --------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_mid_checkpoint_write_leaves_nothing_half_written_and_resumes_bitwise(tmp_path, finished):
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), *tiny(run, finished["cache"])]
    process = subprocess.Popen(with_stalled_checkpoint_write(command), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    half_written = run / "checkpoints" / ".tmp-step-00000004"
    deadline = time.monotonic() + 240
    try:
        while not (half_written / "adapter_model.safetensors").is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the step-4 checkpoint write never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err[-3000:]
    line = one_error_line(err)
    assert "interrupted (Ctrl-C) after step 4 of 4" in line and "resume from step-00000002 with checkpoint.resume=latest" in line
    assert not half_written.exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    resumed = subprocess.run([*command, "checkpoint.resume=latest"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert digest(run) == finished["digest"]


# ------------------------------------------------------------------------------ quick values
@pytest.mark.parametrize("extra, words", [
    (["training.threads=0"], ["training.threads must be >= 1"]),
    (["checkpoint.resume=previous_intact"], ["checkpoint.resume=previous_intact: no checkpoint in"]),
    (["checkpoint.resume=latest", "checkpoint.overwrite=true"], ["contradict each other"]),
], ids=["threads-0", "previous-intact-without-checkpoints", "resume-and-overwrite"])
def test_quick_bad_values(tmp_path, finished, capsys, extra, words):
    code, err = run_cli(capsys, tiny(tmp_path / "run", finished["cache"], *extra))
    line = one_error_line(err)
    assert code == 2 and all(word in line for word in words), line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_run_records_its_thread_count(finished):
    summary = json.loads((finished["run"] / "summary.json").read_text())
    assert summary["threads"]["threads"] == 1  # this module runs at one thread: the rule never raises it
    state = ckpt.read_state(ckpt.list_checkpoints(finished["run"])[-1])
    assert state["threads"] == 1 and len(state["recipe"]["hash"]) == 16


def test_ctrl_c_while_the_model_loads(tmp_path, finished, capsys, monkeypatch):
    import bytetune.trainer.trainer as trainer_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "build_model", interrupted)
    code, err = run_cli(capsys, tiny(tmp_path / "run", finished["cache"]))
    assert code == 130 and "before training started: nothing was written" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_between_steps_in_process(tmp_path, finished, capsys, monkeypatch):
    """The in-process twin of the SIGINT test: Ctrl-C at step 3, one line, then the resume."""
    import bytetune.trainer.trainer as trainer_module

    real_step = trainer_module.Trainer._train_step

    def interrupted_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", interrupted_at_step_3)
    run = tmp_path / "run"
    code, err = run_cli(capsys, tiny(run, finished["cache"]))
    line = one_error_line(err)
    assert code == 130 and "after step 2 of 4" in line and "resume from step-00000002 with checkpoint.resume=latest" in line
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", real_step)
    assert train_main(tiny(run, finished["cache"], "checkpoint.resume=latest")) == 0
    assert digest(run) == finished["digest"]
