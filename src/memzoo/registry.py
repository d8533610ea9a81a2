"""The block registry: short names for the modules that fill a transformer layer's FFN slot.

A *block* is an ``nn.Module`` whose ``__init__(self, dim: int, **hyperparameters)`` builds it and whose
``forward(x)`` maps ``x: (B, T, dim)`` to ``y: (B, T, dim)``. Blocks are found three ways:

1. ``@register_block("name")`` on a class in any imported module (memzoo's own blocks, a user's file loaded with
   ``--plugins my_blocks.py``);
2. an installed package's ``memzoo.blocks`` entry point (``name = "pkg.module:BlockClass"``), loaded on first use;
3. a full dotted path ``"pkg.module.BlockClass"`` used in place of a name.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

ENTRY_POINT_GROUP = "memzoo.blocks"

_REGISTRY: dict[str, type[nn.Module]] = {}
_ENTRY_POINTS_LOADED = False


class UnknownBlockError(KeyError):
    """Raised for a block name that is neither registered nor an importable dotted class path."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class BlockConfigError(ValueError):
    """Raised when a block's hyperparameters do not match its constructor."""


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor argument of a block, as `memzoo blocks` lists it."""

    name: str
    annotation: str
    default: Any  # inspect.Parameter.empty when required


def register_block(name: str, *, override: bool = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a block under ``name`` (lowercase letters, digits, ``_`` and ``-``).

    Registering a second, different class under a taken name raises unless ``override=True``.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name) or name != name.lower():
        raise ValueError(f"block name {name!r} must be non-empty lowercase letters, digits, '_' or '-'")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"@register_block({name!r}) must decorate an nn.Module subclass, got {cls!r}")
        params = inspect.signature(cls.__init__).parameters
        if "dim" not in params:
            raise TypeError(
                f"block {cls.__qualname__} registered as {name!r} must accept `dim` in __init__(self, dim, ...)"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and not override and _qualified(existing) != _qualified(cls):
            raise ValueError(
                f"block name {name!r} is already registered to {_qualified(existing)}; "
                f"pick another name or pass override=True"
            )
        _REGISTRY[name] = cls
        cls.block_name = name
        return cls

    return decorator


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtin_blocks() -> None:
    importlib.import_module("memzoo.blocks")


def _load_entry_points() -> None:
    """Registers blocks advertised by installed packages under the ``memzoo.blocks`` entry-point group."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must say which one it is
            raise ImportError(f"memzoo block plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
        if isinstance(obj, type) and issubclass(obj, nn.Module) and ep.name not in _REGISTRY:
            register_block(ep.name)(obj)


def _ensure_loaded() -> None:
    _load_builtin_blocks()
    _load_entry_points()


def get_block(name: str) -> type[nn.Module]:
    """The block class for a registered ``name`` or a dotted ``"pkg.module.Class"`` path."""
    if not isinstance(name, str):
        raise TypeError(f"block name must be a string, got {type(name).__name__}: {name!r}")
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownBlockError(f"block class path {name!r} could not be imported: {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UnknownBlockError(f"block class path {name!r} is not an nn.Module subclass")
        return cls
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBlockError(
        f"unknown block {name!r}.{hint} Known blocks: {', '.join(known)}. A block of your own is used by "
        f"registering it (@memzoo.register_block) in a module passed with --plugins, through a "
        f"'{ENTRY_POINT_GROUP}' entry point, or by its full dotted class path."
    )


def list_blocks(filter: str | None = None) -> list[str]:
    """Registered block names, sorted; ``filter`` keeps names containing that substring (or matching a glob)."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_REGISTRY)
    if filter:
        pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def block_hyperparameters(name: str) -> list[Hyperparameter]:
    """The constructor arguments of a block besides ``dim`` (and ``pool``, which the model supplies)."""
    cls = get_block(name)
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "dim") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        ann_text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
        out.append(Hyperparameter(p.name, "" if ann is p.empty else str(ann_text), p.default))
    return out


def create_block(name: str, dim: int, **hyperparameters: Any) -> nn.Module:
    """Builds block ``name`` for model width ``dim``; unknown or missing hyperparameters raise a clear error."""
    cls = get_block(name)
    sig = inspect.signature(cls.__init__)
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [p for p in sig.parameters if p not in ("self", "dim")]
    if not accepts_var_kw:
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, allowed, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise BlockConfigError(
                f"block {name!r} got unknown hyperparameter(s) {', '.join(hints)}; "
                f"it accepts: {', '.join(allowed) or '(none)'}"
            )
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "dim")
        and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in hyperparameters
    ]
    if missing:
        raise BlockConfigError(f"block {name!r} needs hyperparameter(s) {', '.join(missing)}")
    try:
        block = cls(dim=dim, **hyperparameters)
    except (TypeError, ValueError) as err:
        raise BlockConfigError(f"block {name!r} (dim={dim}) rejected its hyperparameters: {err}") from err
    record_hyperparameters(block, name, sig.bind(None, dim=dim, **hyperparameters))
    return block


def record_hyperparameters(block: nn.Module, name: str, bound: inspect.BoundArguments) -> None:
    """Stores ``block.block_spec = {"block": name, **resolved hyperparameters}`` (``dim`` excluded).

    A hyperparameter's resolved value is the block's attribute of the same name when the block keeps one (e.g.
    ``k_dim`` that defaulted to ``dim``), else the argument given (or its default). An argument holding a module
    (a shared pool) is recorded as ``None``: its owner (the model) records what it refers to.
    """
    bound.apply_defaults()
    attributes = vars(block)
    spec: dict[str, Any] = {"block": name}
    for key, value in bound.arguments.items():
        if key in ("self", "dim"):
            continue
        if bound.signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            spec.update(value)
            continue
        resolved = attributes.get(key, value)
        spec[key] = None if isinstance(resolved, nn.Module) else resolved
    block.__dict__["block_spec"] = spec


def load_plugins(paths: list[str] | tuple[str, ...] | str) -> list[str]:
    """Imports user modules so their ``@register_block`` classes register; returns the module names loaded.

    Each entry is a ``.py`` file path or an importable module name (``my_pkg.blocks``).
    """
    if isinstance(paths, str):
        paths = [paths]
    loaded = []
    for spec in paths:
        path = Path(spec)
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"plugin file {spec!r} does not exist (from --plugins / plugins:)")
            module_name = f"memzoo_plugin_{path.stem}"
            if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(
                path.resolve()
            ):
                loaded.append(module_name)
                continue
            module_spec = importlib.util.spec_from_file_location(module_name, path.resolve())
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"plugin file {spec!r} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[module_name]
                raise
            loaded.append(module_name)
        else:
            try:
                importlib.import_module(spec)
            except ImportError as err:
                raise ImportError(
                    f"plugin {spec!r} is neither a .py file nor an importable module: {err}"
                ) from err
            loaded.append(spec)
    return loaded
