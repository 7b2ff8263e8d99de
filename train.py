"""Fine-tune with a recipe: ``accelerate launch train.py recipe=NAME [key.sub=value ...]``.

``recipe`` is a name in recipes/ or a path to a YAML file (default: smollm2_lora8). Overrides are
checked against the schema (bytetune/recipe/schema.py) before anything loads. ``--print-config``
prints the resolved recipe and exits. Errors in the recipe, data or checkpoint print one line.
The same command is installed as ``bytetune-train``.
"""

import sys

from bytetune.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
