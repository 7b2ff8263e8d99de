"""bytetune's modules import one way, down the floors, and no file imports itself round a cycle.
The trainer reaches the kernels only through the layers (NOT_BELOW).

Every module under bytetune/ is parsed (not imported) and every import of bytetune that it holds
is collected: module-level or inside a function, absolute or relative. An import names a module
file: ``from bytetune.plan import spec`` is bytetune/plan/spec.py when that file exists, else
bytetune/plan/__init__.py. The parent packages' __init__ files that Python runs on the way are not
counted, since a package's __init__ re-exporting its own modules is not a cycle between files.

Floors, lowest first (LAYERS below): kernels 0; optim, quant_layers 1; recipe 2; plan, loaders 3;
trainer 4; entry points (bytetune/cli.py, the commands beside it, bytetune/cli_lkd.py and
bytetune/cli_generate.py, and the ``python -m`` modules bytetune/lkd.py, bytetune/generate.py) 5. A
module may import its own layer or a lower floor, never a higher floor or another layer of its own
floor (optim and quant_layers do not import each other; nor do plan and loaders). Offending edges
are reported one per line.

loaders (model, tokenizer and data loading) sits on floor 3 beside the planner, not above it: it
needs the layers it quantizes into (quant_layers, 1) and the recipe (2), nothing of the planner,
and the planner, which works on meta-device skeletons, never loads; the lowest floor that holds
both. The trainer (4) and the LKD and generate commands (5) load through it; those two commands
never import the trainer (test_commands_do_not_import_the_trainer).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bytetune"

# (floor, layer, module-name prefixes). A module belongs to the layer of its longest prefix.
LAYERS = [
    (0, "kernels", ("bytetune.kernels",)),
    (1, "optim", ("bytetune.optim",)),
    (1, "quant_layers", ("bytetune.quant_layers",)),
    (2, "recipe", ("bytetune.recipe",)),
    (3, "plan", ("bytetune.plan",)),
    (3, "loaders", ("bytetune.loaders",)),
    (4, "trainer", ("bytetune.trainer",)),
    (5, "entry", ("bytetune.cli", "bytetune.__main__", "bytetune.lkd", "bytetune.generate")),
    # The package root re-exports the floors below (and the trainer, lazily): importing it from
    # inside the package is importing the top.
    (5, "root", ("bytetune",)),
]
# Files whose own imports are not checked: the package root re-exports every floor.
EXEMPT = {"bytetune"}

# Edges of today's tree that break the rules, each to be fixed and then removed from this list
# (test_allowed_violations_still_exist fails once one is gone, so the list only shrinks).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# layer -> lower layers it must not import although they are below it. The trainer runs the loop:
# a layer owns its storage format and the kernels that read it (the fused loss's head goes through
# bytetune.quant_layers.head_loss), so no trainer module imports a kernels module.
NOT_BELOW = {"trainer": {"kernels"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module file ``name`` stands for: itself, or the package/module that defines it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The bytetune modules that ``path`` (module ``name``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: level 1 is the module's own package (a package's __init__ is its own).
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from base import x``: x is a submodule when such a file exists, else a name in base.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "bytetune" or target.startswith("bytetune."):
                resolved = resolve(target, modules)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def layer_of(name: str) -> tuple[int, str]:
    best = None
    for floor, layer, prefixes in LAYERS:
        for prefix in prefixes:
            # "bytetune.cli" also covers bytetune/cli_lkd.py and the like.
            if name == prefix or name.startswith((prefix + ".", prefix + "_")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), floor, layer)
    assert best is not None, f"{name} belongs to no layer: give it a floor in tests/test_layering.py"
    return best[1], best[2]


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items() if name not in EXEMPT}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (an import cycle between files)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def checked_graph() -> dict[str, set[str]]:
    graph = import_graph()
    return {src: {dst for dst in dsts if (src, dst) not in KNOWN_VIOLATIONS} for src, dsts in graph.items()}


def test_every_module_has_a_floor():
    floors = {name: layer_of(name)[0] for name in all_modules()}
    assert floors and set(floors.values()) <= {floor for floor, _, _ in LAYERS}
    # the layers' own packages sit where LAYERS puts them
    assert floors["bytetune.kernels.dispatch"] == 0 and floors["bytetune.trainer.trainer"] == 4


def test_no_upward_or_sideways_import():
    bad = []
    for src, dsts in sorted(checked_graph().items()):
        src_floor, src_layer = layer_of(src)
        for dst in sorted(dsts):
            dst_floor, dst_layer = layer_of(dst)
            if dst_layer == src_layer or dst_floor < src_floor:
                continue
            how = "up" if dst_floor > src_floor else "sideways"
            bad.append(f"{src} ({src_layer}, floor {src_floor}) -> {dst} ({dst_layer}, floor {dst_floor}): {how}")
    assert not bad, "imports against the floors:\n  " + "\n  ".join(bad)


def test_the_trainer_imports_no_kernel():
    bad = []
    for src, dsts in sorted(checked_graph().items()):
        src_layer = layer_of(src)[1]
        bad += [f"{src} -> {dst}" for dst in sorted(dsts) if layer_of(dst)[1] in NOT_BELOW.get(src_layer, ())]
    assert not bad, "imports the layers should make on the trainer's behalf:\n  " + "\n  ".join(bad)
    # and the rule sees such an edge: loss.py imported the fused cross-entropy kernel before
    assert layer_of("bytetune.kernels.fused_linear_ce")[1] in NOT_BELOW[layer_of("bytetune.trainer.loss")[1]]


def test_no_import_cycle_between_files():
    graph = checked_graph()
    cycles = []
    for component in strongly_connected(graph):
        members = set(component)
        edges = [f"{src} -> {dst}" for src in component for dst in sorted(graph[src] & members)]
        cycles.append("cycle through " + ", ".join(component) + ":\n    " + "\n    ".join(edges))
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_commands_do_not_import_the_trainer():
    # The LKD and generate commands load through bytetune.loaders; nothing they import, however
    # indirectly, is the training loop.
    graph = import_graph()
    for command in ("bytetune.cli_lkd", "bytetune.cli_generate"):
        seen, todo = set(), [command]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
        assert "bytetune.loaders.models" in seen, command  # the walk follows its imports
        trainer = sorted(name for name in seen if layer_of(name)[1] == "trainer")
        assert not trainer, f"{command} imports the trainer: {trainer}"


def test_allowed_violations_still_exist():
    graph = import_graph()
    fixed = sorted(f"{src} -> {dst}" for src, dst in KNOWN_VIOLATIONS if dst not in graph.get(src, ()))
    assert not fixed, "fixed, so remove from KNOWN_VIOLATIONS in tests/test_layering.py:\n  " + "\n  ".join(fixed)


def test_the_checker_sees_cycles_and_upward_imports():
    # The walker itself, on edges it must catch: a cycle and a plan -> trainer import.
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
    assert layer_of("bytetune.plan.spec") == (3, "plan")
    assert layer_of("bytetune.trainer.trainer") == (4, "trainer")
    assert layer_of("bytetune.loaders.models") == (3, "loaders")
    assert layer_of("bytetune.cli_lkd") == (5, "entry")
    assert layer_of("bytetune") == (5, "root")
    modules = all_modules()
    runtime = imports_of("bytetune.plan.runtime", modules["bytetune.plan.runtime"], modules)
    assert "bytetune.plan.placement" in runtime and "bytetune.recipe" in runtime
