"""The block registry: short names for the blocks that fill a transformer layer's FFN slot, and named presets.

A *block* is a :class:`~memzoo.blocks.base.Block` built as ``cls(dim, **hyperparameters)`` (the contract is in
:mod:`memzoo.blocks.base`). Blocks are found three ways:

1. ``@register_block("name")`` on a class in any imported module (memzoo's own blocks, a user's file loaded with
   ``--plugins my_blocks.py``);
2. an installed package's ``memzoo.blocks`` entry point (``name = "pkg.module:BlockClass"``), loaded on first use;
3. a full dotted path ``"pkg.module.BlockClass"`` used in place of a name.

A *preset* (:func:`register_preset`) is a name for a registered block with a paper's settings, e.g. ``memory_plus``
= ``product_key_memory`` with qk-norm, the SiLU gate and 4 heads × top-32 (where memzoo's studies chose a default
against the paper, the preset's ``paper`` note says so, as ``pkm``'s causal LayerNorm queries); a config names it like
any block and may override any of its settings. Every name also declares its ``smallest`` settings (and the pools they read), with which the
every-block test (``tests/test_every_block.py``) builds, trains, exports and decodes it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn

from memzoo.blocks.base import Block

ENTRY_POINT_GROUP = "memzoo.blocks"


@dataclass(frozen=True)
class BlockEntry:
    """One registered name: its class, the settings it applies over the class defaults (a preset's), the paper
    they come from, and the smallest settings (with the pools they read) the every-block test builds it with."""

    name: str
    cls: type[Block]
    settings: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    smallest: dict[str, Any] = field(default_factory=dict)
    smallest_pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset_of: str | None = None  # a preset: the registered block name it sets up


_REGISTRY: dict[str, BlockEntry] = {}
_ENTRY_POINTS_LOADED = False


class UnknownBlockError(KeyError):
    """Raised for a block name that is neither registered nor an importable dotted class path."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class BlockConfigError(ValueError):
    """Raised when a block's hyperparameters do not match its constructor."""


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor argument of a block, as `memzoo blocks` lists it (``default``: the preset's setting, else
    the class default)."""

    name: str
    annotation: str
    default: Any  # inspect.Parameter.empty when required


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name) or name != name.lower():
        raise ValueError(f"block name {name!r} must be non-empty lowercase letters, digits, '_' or '-'")


def _check_block_class(cls: Any, what: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{what} must be an nn.Module subclass, got {cls!r}")
    if not issubclass(cls, Block):
        raise TypeError(
            f"{what}: {_qualified(cls)} is an nn.Module but not a memzoo Block; subclass memzoo.Block "
            f"(memzoo.blocks.base.Block) and define forward(self, x, ctx=None)"
        )


def register_block(
    name: str,
    *,
    override: bool = False,
    paper: str = "",
    smallest: Mapping[str, Any] | None = None,
    smallest_pools: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[type[Block]], type[Block]]:
    """Class decorator registering a :class:`Block` under ``name`` (lowercase letters, digits, ``_`` and ``-``).

    ``paper``: where the block's defaults come from; ``smallest``/``smallest_pools``: the smallest settings (and
    ``pools:`` entries for a ``pool: name`` among them) the every-block test uses (default: the class defaults).
    Registering a second, different class under a taken name raises unless ``override=True``.
    """
    _check_name(name)

    def decorator(cls: type[Block]) -> type[Block]:
        _check_block_class(cls, f"@register_block({name!r})")
        params = inspect.signature(cls.__init__).parameters
        if "dim" not in params:
            raise TypeError(
                f"block {cls.__qualname__} registered as {name!r} must accept `dim` in __init__(self, dim, ...)"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and not override and _qualified(existing.cls) != _qualified(cls):
            raise ValueError(
                f"block name {name!r} is already registered to {_qualified(existing.cls)}; "
                f"pick another name or pass override=True"
            )
        cls.block_name = name
        _REGISTRY[name] = BlockEntry(name, cls, {}, paper, dict(smallest or {}), _plain_pools(smallest_pools))
        return cls

    return decorator


def register_preset(
    name: str,
    block: str,
    settings: Mapping[str, Any],
    *,
    paper: str,
    smallest: Mapping[str, Any] | None = None,
    smallest_pools: Mapping[str, Mapping[str, Any]] | None = None,
    override: bool = False,
) -> None:
    """Registers ``name`` as block ``block`` with ``settings`` over its defaults (a paper's configuration; ``paper``
    cites it and names any setting that departs from it).

    The settings are checked against the block's constructor now; ``smallest`` (merged over ``settings``) and
    ``smallest_pools`` are the every-block test's, as in :func:`register_block`.
    """
    _check_name(name)
    if name in _REGISTRY and not override and _REGISTRY[name].settings != dict(settings):
        raise ValueError(f"block name {name!r} is already registered; pick another name or pass override=True")
    base = _REGISTRY.get(block)
    if base is None or base.preset_of is not None:
        raise ValueError(f"preset {name!r}: {block!r} is not a registered block class name")
    allowed = _arguments(base.cls)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"preset {name!r}: block {block!r} has no hyperparameter(s) {unknown}")
    _REGISTRY[name] = BlockEntry(name, base.cls, dict(settings), paper, dict(smallest or {}),
                                 _plain_pools(smallest_pools), preset_of=block)


def _plain_pools(pools: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {key: dict(value) for key, value in (pools or {}).items()}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _arguments(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim")]


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
    """memzoo's own blocks are registered already: importing this module runs ``memzoo/blocks/__init__.py`` first,
    which imports every block module (so this module never imports them back); installed packages' blocks load
    here."""
    _load_entry_points()


def block_entry(name: str) -> BlockEntry:
    """The registry entry of ``name`` (a registered name or preset, or a dotted ``"pkg.module.Class"`` path)."""
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
        try:
            _check_block_class(cls, f"block class path {name!r}")
        except TypeError as err:
            raise UnknownBlockError(str(err)) from None
        return BlockEntry(name, cls)
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBlockError(
        f"unknown block {name!r}.{hint} Known blocks: {', '.join(known)}. A block of your own is used by "
        f"registering it (@memzoo.register_block) in a module passed with --plugins, through a "
        f"'{ENTRY_POINT_GROUP}' entry point, or by its full dotted class path."
    )


def get_block(name: str) -> type[Block]:
    """The block class for a registered name or preset, or a dotted ``"pkg.module.Class"`` path."""
    return block_entry(name).cls


def list_blocks(filter: str | None = None) -> list[str]:
    """Registered block names and presets, sorted; ``filter`` keeps names containing that substring (or matching a
    glob)."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_REGISTRY)
    if filter:
        pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def block_hyperparameters(name: str) -> list[Hyperparameter]:
    """The constructor arguments of a block besides ``dim``, with a preset's settings as their defaults."""
    entry = block_entry(name)
    out = []
    for p in inspect.signature(entry.cls.__init__).parameters.values():
        if p.name in ("self", "dim") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        ann_text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
        default = entry.settings.get(p.name, p.default)
        out.append(Hyperparameter(p.name, "" if ann is p.empty else str(ann_text), default))
    return out


def create_block(
    name: str,
    dim: int,
    *,
    pools: Mapping[str, nn.Module] | None = None,
    vocab_size: int | None = None,
    embedding: nn.Embedding | None = None,
    **hyperparameters: Any,
) -> Block:
    """Builds block (or preset) ``name`` for model width ``dim``; a preset's settings come first, ``hyperparameters``
    override them. Unknown or missing hyperparameters raise a clear error.

    ``vocab_size`` (the model's) is passed to blocks that declare ``needs_vocab_size`` unless the settings give one
    (required unless the block's ``vocab_size`` argument has a default, as ``beside``'s, which hands it on);
    ``embedding`` (the model's token embedding) is attached to blocks that declare ``reads_embedding``.

    ``pool: "<name>"`` (a string) makes a block that ``reads_pool`` read ``pools[name]`` (the model's pools); it is
    recorded by name. The resolved hyperparameters land in ``block.hparams`` (see :func:`record_hyperparameters`).
    """
    entry = block_entry(name)
    cls = entry.cls
    args = {**entry.settings, **hyperparameters}
    pool_name = args.get("pool") if isinstance(args.get("pool"), str) else None
    if pool_name is not None:
        if pools is None or pool_name not in pools:
            defined = ", ".join(sorted(pools or {})) or "none"
            raise BlockConfigError(
                f"block {name!r}: pool {pool_name!r} is not defined; defined pools: {defined}. Add it under the "
                f"model's pools: {{{pool_name}: {{n_keys: ..., value_dim: ...}}}}"
            )
        args["pool"] = pools[pool_name]
    if "pool" in args and not cls.reads_pool:
        raise BlockConfigError(f"block {name!r} does not read memory pools; drop `pool:`")
    sig = inspect.signature(cls.__init__)
    if cls.needs_vocab_size and "vocab_size" not in args:
        if vocab_size is not None:
            args["vocab_size"] = vocab_size
        elif "vocab_size" not in sig.parameters or sig.parameters["vocab_size"].default is inspect.Parameter.empty:
            raise BlockConfigError(f"block {name!r} is indexed by token ids and needs the model's vocab_size")
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = _arguments(cls)
    if not accepts_var_kw:
        unknown = sorted(set(args) - set(allowed))
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
        and p.name not in args
    ]
    if missing:
        raise BlockConfigError(f"block {name!r} needs hyperparameter(s) {', '.join(missing)}")
    try:
        block = cls(dim=dim, **args)
    except (TypeError, ValueError) as err:
        raise BlockConfigError(f"block {name!r} (dim={dim}) rejected its hyperparameters: {err}") from err
    block.hparams = record_hyperparameters(block, name, sig.bind(None, dim=dim, **args), pool_name)
    if cls.reads_embedding and embedding is not None:
        block.attach_embedding(embedding)
    return block


def record_hyperparameters(
    block: nn.Module, name: str, bound: inspect.BoundArguments, pool_name: str | None = None
) -> dict[str, Any]:
    """``{"block": name, **resolved hyperparameters}`` (``dim`` excluded), what ``block.hparams`` holds.

    A hyperparameter's resolved value is the block's attribute of the same name when the block keeps one (e.g.
    ``k_dim`` that defaulted to ``dim``), else the argument given (or its default). The ``pool`` argument is
    recorded as ``pool_name`` (the model's name for it; ``None``: a private pool).
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
        if key == "pool":
            spec[key] = pool_name
            continue
        resolved = attributes.get(key, value)
        spec[key] = None if isinstance(resolved, nn.Module) else resolved
    return spec


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
