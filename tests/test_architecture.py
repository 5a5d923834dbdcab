"""The layering of docs/ARCHITECTURE.md holds for every import in the package: no module
imports one in a later layer, and no imports go in a circle."""

import ast
import graphlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_cultvlm"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] != "__init__":
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known) -> set[str]:
    """The package modules `name` imports, wherever in the file the import is."""
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            elif (node.module or "").startswith("mlx_cultvlm"):
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            found |= {c for c in [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names] if c in known}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mlx_cultvlm.") for a in node.names if a.name.removeprefix("mlx_cultvlm.") in known}
    return found - {name}


def layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layer_of = {}
    for number, block in re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |^\s*$)", text, flags=re.M | re.S):
        for module in re.findall(r"`([a-z_.]+)`", block):
            assert module not in layer_of, f"{module} listed twice"
            layer_of[module] = int(number)
    return layer_of


def test_every_module_is_listed_once_in_its_layer():
    layer_of = layers()
    assert sorted(layer_of) == sorted(modules())


def test_no_module_imports_a_later_layer_and_nothing_is_circular():
    known, layer_of = modules(), layers()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert sum(map(len, graph.values())) > 50  # the parser sees the imports
    upward = [f"{a} (layer {layer_of[a]}) imports {b} (layer {layer_of[b]})"
              for a, targets in graph.items() for b in targets if layer_of[b] > layer_of[a]]
    assert upward == []
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a circle


def test_the_check_catches_a_circle_and_an_upward_import(tmp_path):
    graph = {"a": {"b"}, "b": {"a"}}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        pass
    else:
        raise AssertionError("a circle went unnoticed")
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from .lora import train\n    from . import vlm\n")
    assert imports("data.x", source, {"lora", "vlm", "data.x"}) == set()  # `..` would be needed from data/
    assert imports("x", source, {"lora", "vlm", "x"}) == {"lora", "vlm"}
