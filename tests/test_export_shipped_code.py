"""An export ships memzoo's own model source (``memzoo.export.shipped_code``), not a second implementation: the
shipped files are memzoo's modules byte for byte once the documented rewrite is undone, Hugging Face's loader reaches
every one of them, and they import only the standard library, torch, transformers, each other and optional packages
inside ``try``."""

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from memzoo.export.hf import export_model
from memzoo.export.shipped_code import (
    ROOTS,
    ShippedCodeError,
    ShippedModule,
    rewrite,
    shipped_files,
    shipped_modules,
)
from memzoo.model.config import ModelConfig
from memzoo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
dynamic_module_utils = pytest.importorskip("transformers.dynamic_module_utils")

#: Packages a shipped file may import outside ``try``: torch and transformers, and safetensors, which transformers
#: itself requires (the attention-memory bank's save/load reads it).
REQUIRED = {"torch", "transformers", "safetensors"}
#: Optional packages, imported only inside ``try`` (memzoo falls back to PyTorch without them).
OPTIONAL = {"triton", "xformers", "faiss"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = ModelConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, max_seq_len=32, block="dense",
                         layers={1: {"block": "memory_plus", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16}})
    torch.manual_seed(0)
    return export_model(Transformer(config), tmp_path_factory.mktemp("shipped") / "out", tokenizer="byte")


def test_exported_files_are_the_generated_files(folder):
    files = shipped_files()
    on_disk = {p.name: p.read_bytes() for p in folder.glob("memzoo_*.py")}
    assert set(on_disk) == set(files)
    for name, text in files.items():
        assert on_disk[name] == text.encode("utf-8"), f"{name} differs from memzoo's source after the rewrite"


def test_undoing_the_documented_rewrite_gives_memzoo_source_byte_for_byte(folder):
    """Rules 2 and 3 of ``memzoo.export.shipped_code`` undone by hand: any other difference fails."""
    modules = {m.file_name.removesuffix(".py"): m for m in shipped_modules()}
    for stem, module in modules.items():
        text = (folder / f"{stem}.py").read_text(encoding="utf-8")
        text = re.sub(r'f"memzoo_[0-9a-f]{12}_\{hash\(__name__\) & 0xFFFFFFFF:08x\}::', '"memzoo::', text)
        text = re.sub(r"\bfrom \.(memzoo_\w+) import\b", lambda m: f"from {modules[m.group(1)].name} import", text)
        original = module.path.read_text(encoding="utf-8")
        # memzoo's own relative imports (rule 2 also rewrites them) come back absolute: compare those lines apart
        if original != text:
            diff = [(a, b) for a, b in zip(original.splitlines(), text.splitlines()) if a != b]
            assert all(re.match(r"\s*from \.", a) for a, _ in diff), f"{module.name}: {diff[:3]}"
        assert len(original.splitlines()) == len(text.splitlines())


def test_the_shipped_set_is_the_model_import_closure():
    names = {m.name for m in shipped_modules()}
    assert set(ROOTS) <= names
    assert {"memzoo.model.attention", "memzoo.model.rope", "memzoo.nn.product_key_router",
            "memzoo.ops.product_keys", "memzoo.blocks.peer", "memzoo.blocks.moe"} <= names
    # nothing of training, data, the CLI or export itself
    assert not [n for n in names if n.split(".")[1] in ("training", "data", "export", "cli", "parallel")]


def test_the_loader_reaches_every_shipped_file(folder):
    reached = {Path(f).name for f in dynamic_module_utils.get_relative_import_files(folder / "modeling_memzoo.py")}
    assert reached == {*shipped_files(), "configuration_memzoo.py"}


def _guarded(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside a ``try`` block."""
    return {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}


def test_every_shipped_file_imports_only_torch_transformers_stdlib_siblings_or_guarded_optionals(folder):
    siblings = {p.stem for p in folder.glob("*.py")}
    wrong = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or node.module not in siblings:
                    wrong.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module}")
                continue
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                ok = top in sys.stdlib_module_names or top in REQUIRED or top == "__future__" or (
                    top in OPTIONAL and id(node) in guarded)
                if not ok:
                    wrong.append(f"{path.name}:{node.lineno} imports {top}")
        # what Hugging Face's loader requires to be installed (it skips imports inside try)
        needed = set(dynamic_module_utils.get_imports(path)) - set(sys.stdlib_module_names)
        if not needed <= REQUIRED:
            wrong.append(f"{path.name}: the loader requires {sorted(needed - REQUIRED)}")
    assert not wrong, "\n".join(wrong)


def test_the_generator_refuses_imports_the_loader_cannot_follow(tmp_path):
    for source, message in (("from memzoo.ops import cpu_gather\n", "as names"),
                            ("import memzoo.ops.cpu_gather\n", "cannot be shipped"),
                            ("def f():\n    from memzoo.nowhere import x\n", "not a memzoo module")):
        path = tmp_path / "fake.py"
        path.write_text(source)
        with pytest.raises(ShippedCodeError, match=message):
            rewrite(ShippedModule("memzoo.model.fake", path), "0" * 12)


def test_a_module_is_parsed_again_when_its_file_changes(tmp_path):
    import os

    path = tmp_path / "fake.py"
    module = ShippedModule("memzoo.model.fake", path)
    path.write_text("from memzoo.model.rope import x\n")
    assert rewrite(module, "0" * 12) == "from .memzoo_model_rope import x\n"
    assert rewrite(module, "0" * 12) == "from .memzoo_model_rope import x\n"  # the stored scan
    stat = path.stat()
    path.write_text("from memzoo.model.config import y\n")  # one byte longer
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time: the size tells
    assert rewrite(module, "0" * 12) == "from .memzoo_model_config import y\n"
    path.write_text("from memzoo.model.gguf import xyz\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the time tells
    assert rewrite(module, "0" * 12) == "from .memzoo_model_gguf import xyz\n"


def test_rewrite_changes_only_the_import_path_and_the_op_namespace(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text('from memzoo.ops.product_keys import (\n    candidate_pairs,\n)\nfrom .rope import x  # k\n'
                    'OP = "memzoo::f"\nDOC = "``memzoo::f``"\n')
    assert rewrite(ShippedModule("memzoo.model.fake", path), "abcdef012345") == (
        'from .memzoo_ops_product_keys import (\n    candidate_pairs,\n)\nfrom .memzoo_model_rope import x  # k\n'
        'OP = f"memzoo_abcdef012345_{hash(__name__) & 0xFFFFFFFF:08x}::f"\nDOC = "``memzoo::f``"\n'
    )


def test_the_adapter_picks_the_attention_kernel_of_the_loading_machine(folder, tmp_path):
    """A model trained with ``attention_backend: xformers`` still loads on a machine without CUDA."""
    copy = tmp_path / "xformers-trained"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architecture"]["attention_backend"] = "xformers"
    (copy / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)(ids).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_two_exports_of_the_same_code_keep_their_own_ops_in_one_process(folder, tmp_path):
    """Hugging Face imports each export folder as its own modules; their custom ops get distinct namespaces, so
    loading a second export of the same code does not replace the ops the first one runs on."""
    copy = tmp_path / "same-code-other-folder"
    shutil.copytree(folder, copy)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        first = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        before = first(ids).logits
        second = transformers.AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)
        torch.testing.assert_close(second(ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(first(ids).logits, before, rtol=0, atol=0)
    namespaces = {m.__name__: getattr(m, "_product_key_topk", None) for m in list(sys.modules.values())
                  if getattr(m, "__name__", "").endswith("memzoo_ops_product_keys")}
    ops = {str(op._opoverload) for op in namespaces.values() if op is not None}
    assert len(ops) >= 2, ops  # one namespace per loaded export
