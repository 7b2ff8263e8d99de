"""Which modules of a model are its decoder blocks: one rule for every part of bytetune.

The planner counts per block, FSDP makes one ``fully_shard`` group per block, LKD calibrates
block after block and the pipeline gives each stage a range of blocks; they must agree on what a
block is. The rule:

1. the model's ``nn.ModuleList`` whose entries are all of one class that the model names in
   ``_no_split_modules`` (transformers' own word for "a block that must stay on one device");
2. when the model names no such class, or none of them fills a list: the longest
   ``nn.ModuleList`` whose entries are all of one class (a hand-built stack).

Either way the blocks are the entries of ONE list, in the order the model applies them
(Llama/Mixtral/Qwen ``model.layers``, BLOOM/GPT-2 ``transformer.h``), and a list that holds
something else (e.g. the experts of an older MoE layout, inside a block) is never taken for the
stack, because its entries are not of a block class, or it lies inside a list that is.
"""

from __future__ import annotations

from torch import nn


class NoDecoderBlocks(ValueError):
    """The model holds no list of decoder layers that the rule recognizes."""


def _uniform(module_list: nn.ModuleList) -> bool:
    return len(module_list) > 0 and len({type(entry) for entry in module_list}) == 1


def bare_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name of the list, the list) of ``model``'s decoder blocks, by the module rule.

    ``model`` is a transformers model (a causal LM or its backbone) or a PEFT model around one;
    the name is relative to the transformers model. Raises :class:`NoDecoderBlocks`."""
    model = bare_model(model)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and _uniform(module)]
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    named = [(name, module) for name, module in lists if type(module[0]).__name__ in block_classes]
    # a list inside another one (experts inside a block) is part of a block, not the stack
    outermost = [(name, module) for name, module in lists
                 if not any(name.startswith(f"{outer}.") for outer, _ in lists if outer != name)]
    candidates = named or outermost
    if not candidates:
        raise NoDecoderBlocks(
            f"{type(model).__name__} holds no nn.ModuleList of decoder layers (blocks of one class"
            + (f", {sorted(block_classes)}" if block_classes else "")
            + "): bytetune needs a model whose blocks are applied one after another"
        )
    # the longest; on a tie the first in module order (max keeps the first maximum)
    return max(candidates, key=lambda item: len(item[1]))


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks of ``model`` with their dotted names (see :func:`decoder_block_list`)."""
    list_name, blocks = decoder_block_list(model)
    prefix = f"{list_name}." if list_name else ""
    return [(f"{prefix}{index}", block) for index, block in blocks.named_children()]
