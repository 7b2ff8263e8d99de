"""Loading what a run reads: the base model and its tokenizer (models.py), the training and
held-out data (data.py, local_text.py), and a saved adapter onto its base for prompting
(generation.py). The trainer and the LKD and generate commands all load through here.

Floor 3, beside the planner: it needs the layers (quant_layers) and the recipe, and neither the
planner nor anything above it (it never imports bytetune.plan, and the planner never loads)."""
