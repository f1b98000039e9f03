"""The package's layers: every import points down the layer order or sideways within a layer, never up.

The order is the architecture (README, "Architecture"): core model, tokenizer and sampling at the bottom, then
data, file formats, training, the applications on a loaded model, and the command line at the edge.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "project"
LAYERS = [  # lowest first: (name, the modules and subpackages in it)
    ("core", {"project.files", "project.extras", "project.threads", "project.model", "project.tokenizer",
              "project.decoding", "project.generate", "project.chat", "project.lora"}),
    ("data", {"project.data"}),
    ("formats", {"project.formats"}),
    ("training", {"project.training"}),
    ("applications", {"project.serve", "project.evaluate", "project.guide"}),
    ("edge", {"project.cli", "project.commands", "project.__main__"}),
]
PRINTING = {"project.commands"}  # the one module that prints; the rest log, warn or return values


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index of the layer holding `module` (a module or anything inside a subpackage of the table)."""
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    if module == "project":
        return 0
    raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere (module level or inside functions), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("project"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("project"))
    return names


def source_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(files: dict[str, Path]) -> list[str]:
    return [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for module, path in files.items() for target in sorted(project_imports(path))
            if layer_of(target) > layer_of(module)]


def test_every_module_is_in_a_layer():
    files = source_files()
    assert {"project.model", "project.formats.checkpoint", "project.training.module", "project.commands"} <= set(files)
    for module in files:
        layer_of(module)


def test_imports_point_down_or_sideways():
    assert upward_imports(source_files()) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a core module importing the training layer is reported."""
    (tmp_path / "project").mkdir()
    bad = tmp_path / "project" / "model.py"
    bad.write_text("from project.training.module import GPTModule\n")
    files = {"project.model": bad}
    assert upward_imports(files) == ["project.model (core) imports project.training.module (training)"]
    with pytest.raises(KeyError, match="in no layer"):
        layer_of("project.somewhere_new")


def test_only_the_command_line_prints():
    printing = {module for module, path in source_files().items()
                if re.search(r"^\s*print\(", path.read_text(), flags=re.MULTILINE)}
    assert printing <= PRINTING
