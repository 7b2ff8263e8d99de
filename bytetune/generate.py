"""``python -m bytetune.generate recipe=NAME [adapter=DIR] prompt="..."``: the base's and the
adapted model's completions of a prompt (bytetune/cli_generate.py does the work)."""

import sys

from bytetune.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
