"""Atomic, verified, resumable checkpoints, and the run directory they live in.

A checkpoint is ``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holding the PEFT adapter files, the
optimizer state (8-bit when the optimizer is), the scheduler, every rank's RNG states,
``trainer_state.json`` (step, data position, counters, loss history, model fingerprint, recipe
hash) and ``manifest.json`` (size and sha256 of every other file). It is written into a ``.tmp-``
directory and renamed into place, so a process killed mid-write leaves the previous checkpoint as
the latest one and only a stray ``.tmp-`` directory, which the next save removes. A checkpoint is
verified against its manifest before it is resumed: a truncated or corrupt file is one
:class:`CheckpointError` line naming it and the previous intact checkpoint
(``checkpoint.resume=previous_intact`` takes that one).

Helpers other writers use (the pipeline trainer's per-stage checkpoints, exports):

- :func:`guarded` (``with guarded("writing", path): ...``) turns an ``OSError`` into one
  :class:`RunFileError` line: no space, read-only, a file where a folder should be;
- :func:`atomic_write_text` and :func:`replace_dir` put a file or a finished folder in place by
  rename, so the old one stays whole until the new one is;
- :func:`write_manifest` / :func:`verify` record and check the files of a finished folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bytetune.recipe.schema import RecipeError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"  # in output_dir: the recipe hash of the run that owns the folder
# checkpoint.resume words: the newest checkpoint; the newest one that verifies intact
LATEST_WORDS = ("true", "latest", "yes", "1")
INTACT_WORDS = ("previous_intact", "latest_intact")
FRESH_WORDS = ("false", "no", "0", "")
# What a run writes in output_dir: a fresh run refuses a folder holding any of them (unless
# checkpoint.overwrite), and overwrite removes exactly these (never the whole folder).
RUN_ARTIFACTS = ("checkpoints", "adapter", "merged", "log.jsonl", "summary.json", "recipe.yaml", RUN_FILE,
                 "tensorboard", "loss_curve.png")
# Recipe keys a resumed run may change: they do not change what the steps compute.
# "lkd": python -m bytetune.lkd's options, which training never reads (and which older checkpoints,
# written before the recipe had them, do not record).
RESUMABLE_KEYS = ("name", "output_dir", "checkpoint", "logging", "eval", "export", "lkd", "training.max_steps",
                  "training.epochs", "training.threads", "data.cache_dir", "model.cache_dir", "model.device_map",
                  "data.eval", "data.eval_split", "data.max_eval_chars", "data.max_eval_samples")


class CheckpointError(RecipeError):
    """No checkpoint to resume, or one that is damaged or does not belong to this run."""


class RunFileError(CheckpointError):
    """A file of the run could not be read or written (no space, read-only, a file in the way)."""


# ------------------------------------------------------------------------------------- file I/O
def describe_os_error(error: OSError, doing: str, path: str | Path) -> str:
    """One line for an OSError while ``doing`` (e.g. "writing the checkpoint") ``path``."""
    where = getattr(error, "filename", None) or path
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no space left on the device while {doing} {where}: free space there or set output_dir on another disk"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} while {doing} ({os.strerror(code)}): give an output_dir you can write to"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{where} is in the way while {doing} (a file where a folder belongs, or the reverse): move it or choose another output_dir"
    return f"{doing} {where} failed: {error.strerror or error}"


def _library_write_errors() -> tuple[type[BaseException], ...]:
    # torch.save reports a full disk as RuntimeError ("iostream error", "unexpected pos"), the
    # safetensors writer as its own SafetensorError: neither is an OSError
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (RuntimeError,)
    return (RuntimeError, SafetensorError)


def _as_os_error(error: BaseException, path: str | Path) -> OSError:
    """The OSError a library's write error stands for (a full disk, a read-only one), from its
    text or, failing that, from the free space left where ``path`` is."""
    text = str(error)
    if "No space left" in text or "os error 28" in text or "StorageFull" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "Read-only" in text or "os error 30" in text:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if os.statvfs(existing).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    return OSError(errno.EIO, _first_line(error))


@contextlib.contextmanager
def guarded(doing: str, path: str | Path, after: str = "", library_errors: bool = False):
    """Turn an OSError inside the block into one RunFileError line; ``after`` is appended (e.g.
    what is still intact). ``library_errors``: also the errors torch.save and safetensors raise
    for a failed write (for blocks that only write files)."""
    catch = (OSError, *_library_write_errors()) if library_errors else OSError
    try:
        yield
    except catch as error:
        if not isinstance(error, OSError):
            error = _as_os_error(error, path)
        raise RunFileError(describe_os_error(error, doing, path) + (f"; {after}" if after else "")) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file
    or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with guarded("writing", path):
        try:
            temporary.write_text(text)
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


def replace_dir(temporary: Path, final: Path) -> None:
    """Put the finished folder ``temporary`` at ``final``. An old ``final`` is renamed aside first
    and removed only once the new one is in place, so one of the two is whole at every instant."""
    aside = final.with_name(f".old-{final.name}")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(temporary, final)
    shutil.rmtree(aside, ignore_errors=True)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file under ``directory`` in its manifest.json."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _file_digest(path)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify(directory: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256 (and the state
    file parses); else what is wrong, naming the file. A folder without a manifest (written by an
    older bytetune) is checked only for a readable state file."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step in it")
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} is unreadable or corrupt ({_first_line(error)})"
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable or corrupt ({_first_line(error)})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is truncated or was changed ({size} bytes, {expected['bytes']} when written)"
        if _file_digest(path) != expected["sha256"]:
            return f"{name} is corrupt (its sha256 differs from the one recorded when it was written)"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def read_checked(checkpoint: Path, name: str, loader):
    """``loader(checkpoint / name)``; any failure is one CheckpointError line naming the file
    and how to resume from an earlier checkpoint."""
    try:
        return loader(checkpoint / name)
    except CheckpointError:
        raise
    except Exception as error:  # torch.load, safetensors and json raise many kinds
        raise CheckpointError(
            f"checkpoint {checkpoint}: {name} cannot be read ({_first_line(error)}): "
            f"{_earlier_advice(checkpoint)}"
        ) from None


# ---------------------------------------------------------------------------------- the run dir
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def step_of(checkpoint: Path) -> int:
    match = STEP_DIR.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def _intact_before(checkpoint: Path) -> Path | None:
    """The newest intact checkpoint older than ``checkpoint`` in the same folder."""
    older = [p for p in list_checkpoints(checkpoint.parent.parent) if step_of(p) < step_of(checkpoint)]
    return next((p for p in reversed(older) if verify(p) is None), None)


def _earlier_advice(checkpoint: Path) -> str:
    earlier = _intact_before(checkpoint)
    if earlier is None:
        return "no earlier intact checkpoint is left: start over with checkpoint.overwrite=true"
    return (f"resume from the previous intact checkpoint {earlier.name} with checkpoint.resume=previous_intact "
            f"(or checkpoint.resume={earlier})")


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """None for a fresh start; the checkpoint directory to continue from otherwise, verified.

    ``true``/``latest``: the newest checkpoint, which must be intact; ``previous_intact``: the
    newest one that is intact (damaged newer ones are named in a warning); or a path."""
    if resume is None or str(resume).lower() in FRESH_WORDS:
        return None
    word = str(resume).lower()
    if word in LATEST_WORDS + INTACT_WORDS:
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"checkpoint.resume={resume}: no checkpoint in {checkpoints_dir(output_dir)} "
                "(start without resume, or point checkpoint.resume at a checkpoint directory)"
            )
        if word in LATEST_WORDS:
            chosen = found[-1]
        else:
            damaged = []
            for candidate in reversed(found):
                problem = verify(candidate)
                if problem is None:
                    break
                damaged.append(f"{candidate.name} ({problem})")
            else:
                raise CheckpointError(f"checkpoint.resume={resume}: no intact checkpoint in {checkpoints_dir(output_dir)} "
                                      f"(damaged: {'; '.join(damaged)}): start over with checkpoint.overwrite=true")
            if damaged:
                warnings.warn(f"skipped damaged checkpoints {'; '.join(damaged)}: resuming from {candidate.name}")
            return candidate
    else:
        chosen = Path(resume).expanduser()
        if not (chosen / STATE_FILE).is_file():
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a checkpoint directory (no {STATE_FILE} in it)")
    problem = verify(chosen)
    if problem is not None:
        raise CheckpointError(f"checkpoint {chosen}: {problem}: {_earlier_advice(chosen)}")
    return chosen


def recipe_identity(cfg) -> dict:
    """The resolved recipe without the keys a resumed run may change (RESUMABLE_KEYS): what two
    sessions of one run share."""
    from omegaconf import OmegaConf

    identity = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = identity
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return identity


def recipe_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_difference(recorded: dict, current: dict, limit: int = 3) -> str:
    """``"lora.r (4 there, 8 here)"`` for the first keys where two identities differ."""
    old, new = _flatten(recorded), _flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k} ({old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} here)" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_recipe_matches(checkpoint: Path, state: dict, identity: dict) -> None:
    """A checkpoint written under another recipe is another run's: refuse it in one line."""
    recorded = state.get("recipe")
    if not recorded or recorded.get("hash") == recipe_hash(identity):
        return  # checkpoints of older bytetune versions carry no recipe hash
    raise CheckpointError(
        f"checkpoint {checkpoint} belongs to another run: its recipe differs in "
        f"{recipe_difference(recorded.get('identity', {}), identity)}; resume with that run's recipe, "
        "or start this one in another output_dir (or over it with checkpoint.overwrite=true)"
    )


def check_output_dir(output_dir: str | Path) -> None:
    """output_dir is a folder, or can become one, that this process can write to; fails in one
    line before any model loads otherwise."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFileError(f"output_dir {path} is a file, not a folder: give a folder path for the run")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFileError(f"output_dir {path}: {existing} is a file, not a folder: give a folder path for the run")
    probe = existing / f".bytetune-write-test-{os.getpid()}"
    with guarded("creating output_dir", path):
        try:
            probe.write_bytes(b"")
        finally:
            if probe.exists():
                probe.unlink()


def check_run_dir(output_dir: str | Path, resume, overwrite: bool, identity: dict | None = None) -> None:
    """A fresh run (no resume) needs an output_dir that holds no other run, unless ``overwrite``;
    a resumed one needs checkpoints of the same recipe (checked when the checkpoint is read)."""
    check_output_dir(output_dir)
    resuming = not (resume is None or str(resume).lower() in FRESH_WORDS)
    if overwrite and resuming:
        raise CheckpointError(f"checkpoint.overwrite=true and checkpoint.resume={resume} contradict each other: "
                              "drop overwrite to continue the run, or resume to start over")
    if overwrite or resuming:
        return
    path = Path(output_dir).expanduser()
    present = [name for name in RUN_ARTIFACTS if (path / name).exists()]
    if not present:
        return
    checkpoints = list_checkpoints(path)
    what = f"checkpoints up to {checkpoints[-1].name}" if checkpoints else ", ".join(present[:3])
    owner = "another run"
    if identity is not None:
        try:
            recorded = json.loads((path / RUN_FILE).read_text()).get("recipe_hash")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == recipe_hash(identity):
            owner = "an earlier run of this recipe"
    raise CheckpointError(
        f"output_dir {path} holds {owner} ({what}): continue it with checkpoint.resume=latest, "
        "replace it with checkpoint.overwrite=true, or choose another output_dir"
    )


def clear_run(output_dir: str | Path) -> None:
    """checkpoint.overwrite: remove what an earlier run wrote in output_dir (RUN_ARTIFACTS only)."""
    path = Path(output_dir)
    with guarded("removing the earlier run in", path):
        for name in RUN_ARTIFACTS:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()


def write_run_file(output_dir: str | Path, identity: dict) -> None:
    atomic_write_text(Path(output_dir) / RUN_FILE, json.dumps(
        {"recipe_hash": recipe_hash(identity), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": identity},
        indent=1, default=str))


def set_aside_newer(output_dir: str | Path, resumed: Path) -> list[str]:
    """Checkpoints newer than the one resumed from belong to the abandoned continuation: rename
    them out of the list (``superseded-step-N``) so that "latest" never mixes the two."""
    moved = []
    for newer in list_checkpoints(output_dir):
        if step_of(newer) > step_of(resumed) and newer.parent == resumed.parent:
            aside = newer.with_name(f"superseded-{newer.name}")
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            with guarded("setting aside", newer):
                os.replace(newer, aside)
            moved.append(newer.name)
    return moved


# ---------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ writing a step
def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-step-{step:08d}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:08d}"


def remove_temporaries(output_dir: str | Path) -> None:
    """Drop the ``.tmp-`` folders of interrupted writes (never a finished checkpoint)."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for stray in root.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)


def begin(output_dir: str | Path, step: int) -> Path:
    """Main process: a clean temporary directory for the checkpoint of ``step``."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output_dir)  # left by a killed run
    temporary = temporary_dir(output_dir, step)
    temporary.mkdir()
    return temporary


def write_main(temporary: Path, unwrapped_model, optimizer, scheduler, state: dict) -> None:
    """Main process: adapter, optimizer, scheduler, then the state file that marks completeness."""
    unwrapped_model.save_pretrained(temporary, save_embedding_layers=False)  # as Trainer.save_adapter
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    (temporary / STATE_FILE).write_text(json.dumps(state, indent=1))


def write_rank_rng(temporary: Path, rank: int) -> None:
    torch.save(rng_state(), temporary / f"rng_rank{rank}.pt")


def commit(temporary: Path, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Main process: record the manifest, rename into place (atomic), then drop all but the
    newest ``keep_last``."""
    write_manifest(temporary)
    final = final_dir(output_dir, step)
    # a re-run of the same step (resume from an earlier one) replaces it, never leaving neither
    replace_dir(temporary, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return read_checked(checkpoint, STATE_FILE, lambda path: json.loads(path.read_text()))


def load_rank_rng(checkpoint: Path, rank: int) -> None:
    name = f"rng_rank{rank}.pt"
    if not (checkpoint / name).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no RNG state for rank {rank}: it was written by fewer processes")
    set_rng_state(read_checked(checkpoint, name, lambda path: torch.load(path, weights_only=False)))
