"""``python bench/dry_run.py SCRIPT [ARGS ...]``: run a bench up to its argument parsing, no further.

bench/gpu_check.sh --dry-run checks each of its bench lines this way on a machine without a GPU
(make device-replica): the bench's imports all resolve and the arguments the GPU check passes it
parse, and the run stops right after ``parse_args`` returns, before the bench touches CUDA. Exit
status 0 when the arguments parsed, argparse's 2 when they did not, 1 when the script never
parsed any (nothing was checked).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


class ArgumentsParsed(BaseException):
    """Raised out of the bench at the end of its ``parse_args``: the dry run is complete (a
    BaseException, so that a bench's ``except Exception`` does not swallow it)."""


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(sys.argv) >= 2 else 2
    script, args = sys.argv[1], sys.argv[2:]
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, *a, **k):
        namespace = parse_args(self, *a, **k)  # exits 2 with argparse's message on a bad argument
        raise ArgumentsParsed(namespace)

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *args]
    # as `python SCRIPT` would: the script's folder first on sys.path (its sibling imports)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except ArgumentsParsed as parsed:
        print(f"dry run: {script}: imports ok, arguments parsed: {vars(parsed.args[0])}")
        return 0
    print(f"dry run: {script} finished without parsing arguments: nothing was checked", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
