"""The model source an export ships: memzoo's own modules, generated from the installed memzoo at export time.

Hugging Face's remote-code loader (``transformers.dynamic_module_utils``) imports a folder's modeling file and
brings along only the sibling files it names in relative imports of the form ``from .name import ...`` (it copies
them into its module cache and checks that their other imports are installed). So memzoo's package is shipped flat,
one file per module, and three mechanical rewrites make it importable there; nothing else in a file changes:

1. **File names.** Module ``memzoo.a.b`` (``memzoo/a/b.py``) ships as ``memzoo_a_b.py``; a package ``memzoo.a``
   (``memzoo/a/__init__.py``) as ``memzoo_a.py``.
2. **Imports.** Every ``from memzoo.a.b import <names>`` and every relative ``from .b import <names>`` (top level or
   inside a function) becomes ``from .memzoo_a_b import <names>``: only the module path between ``from`` and
   ``import`` on the statement's first line changes. ``import memzoo...`` and importing a module as a name
   (``from memzoo.ops import cpu_gather``) are refused with :class:`ShippedCodeError`: the loader cannot follow them.
3. **Custom-op namespace.** The string prefix ``"memzoo::`` (``torch.library`` op names) becomes
   ``f"memzoo_<digest>_{hash(__name__) & 0xFFFFFFFF:08x}::``, ``digest`` the first 12 hex digits of the SHA-256 of
   the shipped sources and the second part a per-process name of the module instance, so the shipped ops never
   replace memzoo's own in a process that has both, nor those of another export (Hugging Face imports each export
   folder as its own module: defining one op name twice in a process replaces the first definition under the
   modules that still use it).

The shipped set is every module reachable from :data:`ROOTS` through memzoo imports (lazy ones included), so the
shipped files import only the standard library, ``torch``, each other, and optional packages (Triton, xformers,
faiss) inside ``try`` blocks, where the loader's import check skips them and memzoo's PyTorch paths run when they
are absent. The hand-written Hugging Face adapter (``hf_files/modeling_memzoo.py``) imports from these files.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import memzoo

#: The modules an exported model needs: the decoder, and the blocks package (importing it registers the blocks).
ROOTS = ("memzoo.model.transformer", "memzoo.model.config", "memzoo.blocks")
OP_NAMESPACE = "memzoo::"
_PACKAGE_ROOT = Path(memzoo.__file__).parent


class ShippedCodeError(RuntimeError):
    """A memzoo module in the shipped set uses an import form the flat export layout cannot express."""


@dataclass(frozen=True)
class ShippedModule:
    """One memzoo module: its dotted ``name``, its source ``path`` and the file name it ships as."""

    name: str
    path: Path

    @property
    def file_name(self) -> str:
        return shipped_file_name(self.name)


def shipped_file_name(module: str) -> str:
    """``memzoo.a.b`` → ``memzoo_a_b.py`` (rule 1)."""
    return module.replace(".", "_") + ".py"


def _module_path(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "memzoo":
        return None
    base = _PACKAGE_ROOT.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _import_target(node: ast.ImportFrom, module: ShippedModule) -> str | None:
    """The absolute module a ``from ... import`` names (``None``: not a memzoo module)."""
    if node.level == 0:
        target = node.module or ""
        return target if target == "memzoo" or target.startswith("memzoo.") else None
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


@dataclass(frozen=True)
class ImportSite:
    """One memzoo ``from ... import`` of a module: its 1-based ``line``, the ``column`` where ``from`` starts, and the
    absolute memzoo module it names (``target``)."""

    line: int
    column: int
    target: str


def _memzoo_imports(module: ShippedModule) -> tuple[ImportSite, ...]:
    """Every memzoo ``from ... import`` of ``module`` with its absolute target; refuses forms rule 2 cannot rewrite.
    Parsed once per version of the file (keyed by its modification time and size): an export reads each of the ~40
    modules twice, and a process may export many times."""
    stat = module.path.stat()
    return _scan_imports(module, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _scan_imports(module: ShippedModule, mtime_ns: int, size: int) -> tuple[ImportSite, ...]:
    found = []
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    for node in ast.walk(tree):
        where = f"{module.path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "memzoo" for a in node.names):
            raise ShippedCodeError(f"{where}: `import memzoo...` cannot be shipped; write `from memzoo.x.y import name`")
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _import_target(node, module)
        if target is None:
            continue
        if _module_path(target) is None:
            raise ShippedCodeError(f"{where}: imports from {target!r}, which is not a memzoo module")
        as_modules = [a.name for a in node.names if _module_path(f"{target}.{a.name}") is not None]
        if as_modules:
            raise ShippedCodeError(
                f"{where}: imports module(s) {as_modules} of {target} as names, which Hugging Face's loader cannot "
                f"follow; import the names you use: `from {target}.{as_modules[0]} import ...`"
            )
        found.append(ImportSite(node.lineno, node.col_offset, target))
    return tuple(found)


def shipped_modules() -> list[ShippedModule]:
    """The modules an export ships: the closure of :data:`ROOTS` under memzoo imports, sorted by name."""
    seen: dict[str, ShippedModule] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_path(name)
        if path is None:
            raise ShippedCodeError(f"{name} is not a memzoo module")
        seen[name] = ShippedModule(name, path)
        todo.extend(site.target for site in _memzoo_imports(seen[name]))
    files = [m.file_name for m in seen.values()]
    if len(set(files)) != len(files):
        raise ShippedCodeError(f"two memzoo modules ship under one file name: {sorted(files)}")
    return [seen[name] for name in sorted(seen)]


def source_digest(modules: list[ShippedModule]) -> str:
    """12 hex digits of the SHA-256 over the shipped modules' names and source bytes (rule 3)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.name.encode() + b"\0" + module.path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def rewrite(module: ShippedModule, digest: str) -> str:
    """``module``'s source after rules 2 and 3."""
    lines = module.path.read_text(encoding="utf-8").splitlines(keepends=True)
    for site in _memzoo_imports(module):
        index = site.line - 1
        line = lines[index]
        match = re.compile(r"from\s+(\S+)\s+import\b").match(line, site.column)
        if match is None:
            raise ShippedCodeError(f"{module.path}:{site.line}: `from <module> import` must start on one line")
        relative = "." + shipped_file_name(site.target).removesuffix(".py")
        lines[index] = line[: match.start(1)] + relative + line[match.end(1):]
    return "".join(lines).replace(f'"{OP_NAMESPACE}', 'f"memzoo_' + digest + '_{hash(__name__) & 0xFFFFFFFF:08x}::')


def shipped_files() -> dict[str, str]:
    """``{file name: text}`` of every shipped module, generated from the installed memzoo source."""
    modules = shipped_modules()
    digest = source_digest(modules)
    return {module.file_name: rewrite(module, digest) for module in modules}
