"""``python bench/dry_run.py SCRIPT [ARGS ...] [--- SCRIPT [ARGS ...] ...]``: run each script up to
its argument parsing, no further.

bench/gpu_check.sh --dry-run checks its bench and trainer lines this way on a machine without a
GPU (make device-replica): each script's imports resolve and the arguments the GPU check passes it
parse; the run stops right after ``parse_args`` returns, before the script touches CUDA. A script
without argparse passes when it exits 0 by itself (``train.py ... --print-config`` checks the
recipe and every override and exits). All scripts run in this one process, one after the other
(an import of torch and transformers costs seconds). Exit status 0 when every line passed, else 1.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback


class ArgumentsParsed(BaseException):
    """Raised out of the bench at the end of its ``parse_args``: the dry run is complete (a
    BaseException, so that a bench's ``except Exception`` does not swallow it)."""


def dry_run(script: str, args: list[str]) -> str | None:
    """None when ``script args`` parsed (or exited 0 by itself), else what went wrong."""
    sys.argv = [script, *args]
    # as `python SCRIPT` would: the script's folder first on sys.path (its sibling imports)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except ArgumentsParsed as parsed:
        print(f"dry run: {script}: imports ok, arguments parsed: {vars(parsed.args[0])}", flush=True)
        return None
    except SystemExit as done:
        if done.code in (0, None):
            print(f"dry run: {script} {' '.join(args)}: exited 0", flush=True)
            return None
        return f"exited {done.code}"
    except Exception as error:  # an import or a module-level statement failed
        traceback.print_exc()
        return f"{type(error).__name__}: {error}"
    finally:
        sys.path.pop(0)
    return "finished without parsing arguments: nothing was checked"


def main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    lines, line = [], []
    for arg in argv:
        if arg == "---":
            lines.append(line)
            line = []
        else:
            line.append(arg)
    lines.append(line)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, *a, **k):
        namespace = parse_args(self, *a, **k)  # exits 2 with argparse's message on a bad argument
        raise ArgumentsParsed(namespace)

    argparse.ArgumentParser.parse_args = parse_and_stop
    failed = []
    for script, *args in (line for line in lines if line):
        problem = dry_run(script, args)
        if problem:
            print(f"dry run: FAILED {script} {' '.join(args)}: {problem}", file=sys.stderr, flush=True)
            failed.append(script)
    print(f"dry run: {len([line for line in lines if line]) - len(failed)} lines ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
