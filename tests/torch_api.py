"""The torch API dsv4 names, held against what the oldest supported torch has: the GPU machine's 2.11
(`../shared/device.md`), while CI and this machine run 2.13. A name torch added after 2.11 (2.13 renamed
`all_gather_into_tensor` to `all_gather_single`, and expert parallelism called the new name) fails there at run
time, so the first GPU run would find it; a CUDA build of 2.11 is gigabytes, too big for CI.

So the code is read (its `torch...` attribute chains and `from torch... import` names, through each file's import
aliases such as ``dist`` or ``F``), and each chain is looked up module by module in a record of 2.11's modules and
their attributes (`fixtures/torch_2_11_api.json`). What is checked: each module on the way and the first
attribute past the last module (a class's members are not). What is not: methods called on tensors, and names
reached by `getattr`, which is how code asks for a newer name it can do without.

    python tests/torch_api.py --write     # under torch 2.11 (a CUDA build imports on a CPU machine): the record
    python tests/torch_api.py             # the chains the record lacks

`tests/test_torch_api.py` runs the check.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("fixtures") / "torch_2_11_api.json"
SOURCES = ("dsv4", "benchmarks", "tests")


def _aliases(tree: ast.AST) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """A file's names bound to torch modules or their members (``F`` -> torch.nn.functional), and the chains its
    ``from torch... import`` statements name."""
    aliases, imported = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or alias.name.startswith("torch."):
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["torch"] = "torch"
                    imported.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "torch" or node.module.startswith("torch.")):
            for alias in node.names:
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    imported.append((f"{node.module}.{alias.name}", node.lineno))
    return aliases, imported


def _chain(node: ast.Attribute) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"], or None where the chain does not start at a name (a call's result, ...)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def chains(root: Path = ROOT) -> Iterator[tuple[str, str]]:
    """(dotted torch name, "file:line") for every torch name the sources spell out."""
    for folder in SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            aliases, imported = _aliases(tree)
            where = path.relative_to(root)
            for name, line in imported:
                yield name, f"{where}:{line}"
            outer = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and id(node) not in outer:  # whole chains only
                    parts = _chain(node)
                    if parts and parts[0] in aliases:
                        yield ".".join([aliases[parts[0]], *parts[1:]]), f"{where}:{node.lineno}"


def missing(name: str, modules: dict[str, list[str]]) -> str | None:
    """What the record says is not there on the way to `name` (a module it does not hold, or an attribute its
    module lacks), or None."""
    parts = name.split(".")
    module = parts[0]
    for attr in parts[1:]:
        if module not in modules:
            return f"module {module} (not in the record)"
        if modules[module] is None:  # (a subpackage needing a package that was not installed: unchecked)
            return None
        if f"{module}.{attr}" in modules:
            module = f"{module}.{attr}"
        elif attr not in modules[module]:
            return f"{module}.{attr}"
        else:
            return None  # a class or function: its members are not checked
    return None


def record() -> dict:
    """This torch's modules on the way to every name the sources spell out, with their attributes."""
    import torch

    names = {name for name, _ in chains()}
    for name in sorted(names):  # the submodules an import statement brings in
        for end in range(len(name.split(".")), 0, -1):
            try:
                importlib.import_module(".".join(name.split(".")[:end]))
                break
            except ImportError:
                continue
    modules = {}
    for name in sorted(names):
        obj, path = torch, "torch"
        for attr in name.split(".")[1:]:
            if not isinstance(obj, types.ModuleType):
                break
            modules[path] = sorted(dir(obj))
            if not hasattr(obj, attr):
                if importlib.util.find_spec(f"{path}.{attr}") is not None:  # (its import needs a missing package)
                    modules[f"{path}.{attr}"] = None
                break
            obj, path = getattr(obj, attr), f"{path}.{attr}"
        else:
            if isinstance(obj, types.ModuleType):
                modules[path] = sorted(dir(obj))
    return {"torch": torch.__version__, "modules": modules}


def main() -> int:
    if "--write" in sys.argv[1:]:
        RECORD.write_text(json.dumps(record(), indent=0, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")
    held = json.loads(RECORD.read_text())
    lacking = sorted({(name, where, why) for name, where in chains()
                      if (why := missing(name, held["modules"])) is not None})
    for name, where, why in lacking:
        print(f"{where}: {name}: torch {held['torch']} lacks {why}")
    return 1 if lacking else 0


if __name__ == "__main__":
    sys.exit(main())
