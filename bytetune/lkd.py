"""``python -m bytetune.lkd recipe=NAME key=value ...``: layer-by-layer distillation of a model into
ZeroQuant layers (the command is bytetune/cli_lkd.py, the algorithm bytetune.quant_layers.lkd)."""

import sys

from bytetune.cli import lkd_main

if __name__ == "__main__":
    sys.exit(lkd_main(sys.argv[1:]))
