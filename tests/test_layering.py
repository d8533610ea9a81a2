"""memzoo's import layering and its import graph.

Layers: ``ops <- nn <- blocks <- model <- parallel <- training <- export / cli``, data beside them. Every import of a
memzoo module anywhere in a file (top level, inside a function, under ``TYPE_CHECKING``, relative
``from . import x`` / ``from ..blocks import y``, and a string that is a dotted memzoo path such as a ``class_path``
value or an ``importlib.import_module`` argument) must name a package its layer may use, and the graph of these
imports between the modules of ``src/memzoo`` (top-level modules included) has no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import memzoo

PACKAGE = Path(memzoo.__file__).parent

#: The first component under memzoo of each module -> the components it may import.
LOW = {"ops", "nn", "atomic", "safe_load", "lazy_exports"}
ALLOWED = {
    "ops": {"ops"},
    "nn": {"ops", "nn"},
    "atomic": set(),
    "safe_load": set(),
    "lazy_exports": set(),
    "config_yaml": set(),
    "config_errors": set(),
    "cli_base": set(),
    "host_allocator": set(),  # the process's allocator settings: stdlib only
    "subnormals": set(),  # the CPU float mode while a training verb runs: torch only
    "machine": set(),  # the processor or GPU a result was measured on: torch and the stdlib only
    "registry": {"blocks"},  # the public path of memzoo.blocks.registry
    "blocks": LOW | {"blocks"},
    "model": LOW | {"registry", "blocks", "model"},
    "data": LOW | {"data"},
    "parallel": LOW | {"registry", "blocks", "model", "parallel"},
    "training": LOW | {"registry", "blocks", "model", "parallel", "training"},
}
#: Top layer: may import anything (but still no cycle).
TOP = {"export", "pretrained", "loading", "build", "accounting", "config_accounting", "config_overrides", "cli",
       "cli_lightning", "cli_verbs", "__main__", "__init__"}
#: Files shipped into export folders: they import only torch and transformers (tested in test_export).
SHIPPED = ("export", "hf_files")
#: A string that is a whole dotted memzoo path (a class path or module name given as data).
DOTTED_PATH = re.compile(r"memzoo(\.[A-Za-z_]\w*)+")
#: Strings that look like a dotted path but name no import: (file, string) -> why.
NOT_AN_IMPORT = {
    ("blocks/registry.py", "memzoo.blocks"): "the entry-point group name",
    ("parallel/strategy.py", "memzoo.save_checkpoint"): "a barrier's name",
    ("parallel/strategy.py", "memzoo.save_checkpoint.renamed"): "a barrier's name",
}


def module_names(package: Path) -> dict[str, Path]:
    """Every module under ``package`` by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def imported_names(path: Path, name: str, root: str = "memzoo", skip: frozenset = frozenset()) -> set[str]:
    """The dotted names (under ``root``) that module ``name`` (file ``path``) imports: absolute and relative imports
    anywhere in the file, and strings that are whole dotted paths (docstrings excluded; ``skip``: strings that are
    not imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    docstrings = _docstring_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{path}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and DOTTED_PATH.fullmatch(node.value.replace(root, "memzoo", 1)) and node.value not in skip):
            found.add(node.value)
    return {n for n in found if n == root or n.startswith(root + ".")}


def import_graph(package: Path, skip: dict | None = None) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (a name is resolved to its longest module prefix: ``from
    memzoo.blocks import dense`` is the module ``memzoo.blocks.dense``, ``from memzoo.blocks import MoE`` the
    package ``memzoo.blocks``, ``"memzoo.blocks.dense.DenseMLP"`` the module ``memzoo.blocks.dense``)."""
    modules = module_names(package)
    skip = skip or {}
    graph = {}
    for name, path in modules.items():
        relative = path.relative_to(package).as_posix()
        if relative.startswith("/".join(SHIPPED)):
            continue
        not_imports = frozenset(s for (file, s) in skip if file == relative)
        edges = set()
        for target in imported_names(path, name, package.name, not_imports):
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, iterators = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            target = next(iterators[-1], None)
            if target is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(target) == 1:
                return path[path.index(target):] + [target]
            elif target not in state and target in graph:
                state[target] = 1
                path.append(target)
                iterators.append(iter(sorted(graph[target])))
    return None


def layer_violations(package: Path, skip: dict | None = None) -> list[str]:
    """``"<file> imports <root>.<layer>"`` for every import that runs back up the layers."""
    wrong = []
    for name, targets in import_graph(package, skip).items():
        parts = name.split(".")[1:]
        relative = module_names(package)[name].relative_to(package)
        layer = parts[0] if parts else "__init__"
        if layer in TOP:
            continue
        assert layer in ALLOWED, f"{relative}: add its layer to ALLOWED in this test"
        for target in sorted({t.split(".")[1] for t in targets if "." in t} - ALLOWED[layer]):
            wrong.append(f"{relative} imports {package.name}.{target}")
    return wrong


# ----------------------------------------------------------------------------------------------- memzoo


def test_no_import_runs_back_up_the_layers():
    wrong = layer_violations(PACKAGE, NOT_AN_IMPORT)
    assert not wrong, "imports that run back up the layers:\n" + "\n".join(wrong)


def test_memzoo_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE, NOT_AN_IMPORT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ----------------------------------------------------------------------------------------------- planted faults


def test_the_check_sees_absolute_relative_and_string_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""memzoo.export.hf is named in a docstring, which imports nothing."""\n'
        "def f():\n    from memzoo.training.module import LanguageModel\n"
        "from . import sibling\nfrom ..blocks import dense\n"
        'PATH = {"class_path": "memzoo.cli.main"}\nMESSAGE = "see memzoo.data for more"\n'
    )
    found = imported_names(bad, "memzoo.model.bad")
    assert "memzoo.training.module.LanguageModel" in found
    assert {"memzoo.model.sibling", "memzoo.blocks.dense", "memzoo.cli.main"} <= found
    assert not any(n.startswith(("memzoo.export", "memzoo.data")) for n in found)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "memzoo"
    for relative, text in {"__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize(
    "files",
    [
        {"cli.py": "from memzoo.cli_verbs import run\n", "cli_verbs.py": "def g():\n    from memzoo import cli\n"},
        {"model/__init__.py": "", "model/a.py": "from . import b\n", "model/b.py": "from .a import thing\n"},
        {"blocks/__init__.py": "from memzoo.blocks.dense import D\n",
         "blocks/dense.py": "import importlib\nM = importlib.import_module('memzoo.blocks')\n"},
    ],
    ids=["lazy", "relative", "string"],
)
def test_a_planted_cycle_fails_naming_it(tmp_path, files):
    package = _plant(tmp_path, files)
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 3, cycle
    assert find_cycle({"memzoo.a": {"memzoo.b"}, "memzoo.b": set()}) is None


@pytest.mark.parametrize(
    "text",
    ["from ..training import module\n", "X = 'memzoo.training.module.LanguageModel'\n",
     "def f():\n    import memzoo.training\n"],
    ids=["relative", "string", "lazy"],
)
def test_a_planted_upward_import_fails(tmp_path, text):
    package = _plant(tmp_path, {"model/__init__.py": "", "model/bad.py": text, "training/__init__.py": "",
                                "training/module.py": ""})
    assert layer_violations(package) == ["model/bad.py imports memzoo.training"]


# ----------------------------------------------------------------------------------------------- Lightning stays out

#: Run in a fresh interpreter (the test process has Lightning loaded): records the stack of the first import of
#: Lightning, then loads every model given and runs ``memzoo generate --help`` and ``memzoo generate`` on the first.
_NO_LIGHTNING_PROBE = """
import json, sys, traceback

first_import = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning") and not first_import:
            first_import.append(name + " imported by:\\n" + "".join(traceback.format_stack(limit=25)))
        return None

sys.meta_path.insert(0, Watch())
import memzoo
from memzoo.cli import main

folders = json.loads(sys.argv[1])
for folder in folders:
    memzoo.load_pretrained(folder)
try:
    main(["generate", "--help"])
except SystemExit:
    pass
main(["generate", "--model", folders[0], "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu"])
print(json.dumps(first_import))
"""


def _plain_hf_llama_folder(folder: Path, tokenizer_json: Path) -> Path:
    """A tiny random Llama folder as ``save_pretrained`` writes it (config.json, model.safetensors, tokenizer.json),
    written without transformers."""
    import json

    import torch
    from safetensors.torch import save_file

    dim, hidden, layers, heads, kv_heads, vocab = 32, 48, 2, 4, 2, 258
    kv = dim // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in {
            "input_layernorm.weight": (dim,), "post_attention_layernorm.weight": (dim,),
            "self_attn.q_proj.weight": (dim, dim), "self_attn.k_proj.weight": (kv, dim),
            "self_attn.v_proj.weight": (kv, dim), "self_attn.o_proj.weight": (dim, dim),
            "mlp.gate_proj.weight": (hidden, dim), "mlp.up_proj.weight": (hidden, dim),
            "mlp.down_proj.weight": (dim, hidden)}.items()})
    generator = torch.Generator().manual_seed(0)
    folder.mkdir()
    save_file({name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}))
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


def test_loading_a_model_and_generating_never_import_lightning(tmp_path):
    """``memzoo.load_pretrained`` (a plain Hugging Face folder, a memzoo export, a memzoo .ckpt) and ``memzoo
    generate`` need no trainer: Lightning (~5 s of imports) stays unimported."""
    import json
    import subprocess
    import sys

    import torch

    from memzoo.export.hf import export_model
    from memzoo.model.config import ModelConfig
    from memzoo.model.transformer import Transformer

    config = ModelConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, max_seq_len=40)
    model = Transformer(config).eval()
    export = export_model(model, tmp_path / "export", tokenizer="byte")
    hf = _plain_hf_llama_folder(tmp_path / "hf", export / "tokenizer.json")
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"architecture": config.to_dict()}}, checkpoint)
    done = subprocess.run([sys.executable, "-c", _NO_LIGHTNING_PROBE, json.dumps([str(hf), str(export),
                           str(checkpoint)])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: memzoo generate" in done.stdout
    first_import = json.loads(done.stdout.strip().splitlines()[-1])
    assert first_import == [], first_import[0]


def test_lazy_public_names_resolve():
    """``memzoo.data`` and ``memzoo.parallel`` import their Lightning subclasses on first use; every public name
    still imports, ``parallelize`` is the function (not its submodule), and unknown names raise AttributeError."""
    import sys

    import memzoo.data
    import memzoo.parallel
    import memzoo.parallel.parallelize  # noqa: F401  (the submodule, imported again)

    for package in (memzoo.data, memzoo.parallel):
        for name in package.__all__:
            value = getattr(package, name)
            assert value.__name__ == name and name in dir(package)
        with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
            package.Nothing  # noqa: B018
    from memzoo.parallel import parallelize

    assert callable(parallelize) and parallelize is sys.modules["memzoo.parallel.parallelize"].parallelize
    from memzoo.data import LMDataModule, TextDataModule

    assert issubclass(TextDataModule, LMDataModule) and memzoo.TextDataModule is TextDataModule


def test_short_class_names_resolve_in_a_fresh_cli(tmp_path):
    """``memzoo fit`` resolves short class names among the imported subclasses: the lazily imported data modules
    and strategies are imported by the CLI itself (a fresh process: the test process may have imported them)."""
    import subprocess
    import sys

    strategy = '{"class_path": "MemoryParallelStrategy", "init_args": {"memory_parallel": 2}}'
    done = subprocess.run([sys.executable, "-m", "memzoo", "fit", "--print_config", "--data", "TextDataModule",
                           "--data.path", "x.txt", "--trainer.strategy", strategy],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "class_path: memzoo.parallel.MemoryParallelStrategy" in done.stdout
    assert "class_path: memzoo.TextDataModule" in done.stdout
