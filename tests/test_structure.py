"""The package's shape, read from its import statements: no import cycles, no private names taken across modules,
every import downward in the layering, the reference kernels reached only through the seam, no class swaps.

The layers (a module may import its own unit and the units of lower layers only):

    0  config, quant, text_table, dsv4.demo (the package: where the shipped model lives), demo.tools (the demo's
       tool definitions and weather table, which the server's chat page serves)
    1  kernels, chat
    2  model, kv_formats
    3  formats, checkpoint, parallel
    4  engine, generate, train, plan
    5  serve
    6  runtime
    7  demo.* (corpus, recipe, evaluation)
    8  commands, cli, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsv4"

LAYERS = {
    "dsv4.config": 0, "dsv4.quant": 0, "dsv4.text_table": 0, "dsv4.demo": 0, "dsv4.demo.tools": 0,
    "dsv4.kernels": 1, "dsv4.chat": 1,
    "dsv4.model": 2, "dsv4.kv_formats": 2,
    "dsv4.formats": 3, "dsv4.checkpoint": 3, "dsv4.parallel": 3,
    "dsv4.engine": 4, "dsv4.generate": 4, "dsv4.train": 4, "dsv4.plan": 4, "dsv4.plots": 4,
    "dsv4.serve": 5,
    "dsv4.runtime": 6,
    "dsv4.demo.": 7,
    "dsv4.commands": 8, "dsv4.cli": 8, "dsv4.__main__": 8,
}


def module_name(path: Path) -> str:
    return ".".join(("dsv4", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported dsv4 module, imported name or None) of every import statement in `module`, relative imports
    resolved; `from package import submodule` counts as importing the submodule."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("dsv4")]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(p for p in (base, node.module) if p)
            if source != "dsv4" and not source.startswith("dsv4."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (source, alias.name))
    return found


def layer(module: str) -> tuple[str, int]:
    """The unit a module belongs to (the longest matching key of LAYERS) and its layer."""
    def contains(key: str) -> bool:  # "unit." holds only the unit's submodules, "unit" the unit and them
        return module.startswith(key) if key.endswith(".") else module == key or module.startswith(key + ".")

    best = max(filter(contains, LAYERS), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add its unit to LAYERS"
    return best, LAYERS[best]


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "dsv4":
            layer(module)


def test_imports_go_downward():
    upward = []
    for module in MODULES:
        if module == "dsv4":
            continue  # the lazy public API at the top
        unit, level = layer(module)
        for target, _ in imports(module):
            if target == "dsv4":
                continue
            target_unit, target_level = layer(target)
            if target_unit != unit and target_level > level:
                upward.append(f"{module} (layer {level}) imports {target} (layer {target_level})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_names_cross_modules():
    taken = [f"{m} takes {name} from {source}" for m in MODULES for source, name in imports(m)
             if name is not None and name.startswith("_") and source != m]
    assert not taken, taken


def test_the_reference_kernels_are_reached_only_through_the_seam():
    direct = [m for m in MODULES if not m.startswith("dsv4.kernels")
              and any(t == "dsv4.kernels.reference" for t, _ in imports(m))]
    assert not direct, direct


def test_the_model_imports_only_what_it_stands_on():
    allowed = ("dsv4.model", "dsv4.config", "dsv4.kernels", "dsv4.quant")
    outside = [(m, t) for m in MODULES if m.startswith("dsv4.model") for t, _ in imports(m)
               if not t.startswith(allowed)]
    assert not outside, outside


def test_no_class_is_swapped_on_an_instance():
    swaps = [m for m, path in MODULES.items() if "__class__ =" in path.read_text(encoding="utf-8")]
    assert not swaps, swaps
