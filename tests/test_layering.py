"""memzoo's import layering: ``ops <- nn <- blocks <- model <- training <- export / cli``, data beside them.

Every ``import memzoo.X`` anywhere in a module (top level or inside a function) must name a package its layer may
use, so no import runs back up the stack and no cycle can form between layers."""

import ast
from pathlib import Path

import memzoo

PACKAGE = Path(memzoo.__file__).parent

#: The first component under memzoo of each module -> the components it may import.
LOW = {"ops", "nn", "atomic", "safe_load"}
ALLOWED = {
    "ops": {"ops"},
    "nn": {"ops", "nn"},
    "atomic": set(),
    "safe_load": set(),
    "config_yaml": set(),
    "config_errors": set(),
    "registry": {"blocks"},  # the public path of memzoo.blocks.registry
    "blocks": LOW | {"blocks"},
    "model": LOW | {"registry", "blocks", "model"},
    "data": LOW | {"data"},
    "training": LOW | {"registry", "blocks", "model", "training"},
    "parallel": LOW | {"registry", "blocks", "model", "training", "parallel"},
}
#: Top layer: may import anything.
TOP = {"export", "pretrained", "loading", "build", "accounting", "cli", "cli_lightning", "cli_verbs", "__main__", "__init__"}


def memzoo_imports(path: Path) -> set[str]:
    """The first components under ``memzoo`` of every memzoo module ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "memzoo"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "memzoo" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_import_runs_back_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "export" and relative.parts[1] == "hf_files":
            continue  # shipped to export folders: imports only torch and transformers (tests/test_export_shipped_code.py)
        layer = relative.parts[0].removesuffix(".py")
        if layer in TOP:
            continue
        assert layer in ALLOWED, f"{relative}: add its layer to ALLOWED in this test"
        for target in memzoo_imports(path) - ALLOWED[layer]:
            wrong.append(f"{relative} imports memzoo.{target}")
    assert not wrong, "imports that run back up the layers:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    upward = tmp_path / "bad.py"
    upward.write_text("def f():\n    from memzoo.training.module import LanguageModel\n")
    assert memzoo_imports(upward) == {"training"}
