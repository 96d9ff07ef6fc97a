"""The package's layering: every import points down (or across) the floors below, never up, and no
module imports itself back through others. Imports only for type checking (`if TYPE_CHECKING:`) do
not count: they run nothing. Also: no source file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmadapter"

# Floors, bottom first. A module may import from its own floor or any floor below.
LAYERS = [
    ("foundation", ["config", "matvec", "packed_rows", "atomic", "safe_io", "images", "loss", "distributed", "stop_signals", "plot",
                    "towers", "data.templates", "data.records", "data.shapes"]),
    ("pieces", ["llama", "tuning", "prefix_reuse", "mlp_projector", "visual_query", "spatial_tokens", "int4_layout",
                "tokenizer_error", "tokenizer_hf", "tokenizer_sentencepiece", "tokenizer_gguf", "tokenizer", "gguf_tensor",
                "tower_weights", "vision", "feature_cache", "prefix_cache", "data.encode",
                "data.scienceqa"]),
    ("adapter, loaders, decoding", ["adapter", "quant", "weights_checks", "weights_hf", "weights_meta", "weights_gguf",
                                    "weights", "decode_step", "generate", "compiled_step"]),
    ("the composed model", ["model", "adapter_file"]),
    ("adapter files in and out", ["interop", "interop_v2", "adapter_set", "checkpoint"]),
    ("workflows", ["train_data", "train_log", "train", "evaluation", "batch_profile", "batching", "demo"]),
    ("entry points", ["app", "commands", "cli", "__main__", ""]),  # "": the package's public API (__init__)
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def layer_of(module: str) -> int:
    for floor, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                return floor
    for floor, (_, prefixes) in enumerate(LAYERS):  # a sub-package's __init__: the floor of its members
        if any(p.startswith(module + ".") for p in prefixes if module):
            return floor
    raise AssertionError(f"mmadapter.{module} is on no floor: add it to LAYERS in {Path(__file__).name}")


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports (at any depth of the file, outside TYPE_CHECKING blocks)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.startswith("mmadapter."):
                    found.add(alias.name.removeprefix("mmadapter."))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "mmadapter" or node.module.startswith("mmadapter.")):
                target = node.module.removeprefix("mmadapter").removeprefix(".")
            else:
                return
            for alias in node.names:  # `from . import x` imports the module x
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {m: imports_of(m, p, set(names)) for m, p in names.items()}


def test_every_import_points_down_the_floors():
    upward = [f"mmadapter.{m} ({LAYERS[layer_of(m)][0]}) imports mmadapter.{t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "imports up the floors:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, "import circle: " + " -> ".join(f"mmadapter.{c}" for c in cycle)


def test_the_scanner_resolves_relative_lazy_and_type_only_imports(tmp_path: Path):
    source = tmp_path / "fake.py"
    source.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                      "from .records import Example\nif TYPE_CHECKING:\n    from ..train import Trainer\n"
                      "def f():\n    from .. import model\n    import mmadapter.config\n")
    found = imports_of("data.fake", source, {"data.records", "model", "train", "config"})
    assert found == {"data.records", "model", "config"}  # the TYPE_CHECKING import runs nothing
    assert layer_of("model") > layer_of("data.records")  # so an import of model from data points up


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"
