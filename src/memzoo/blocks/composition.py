"""``beside``: a block that runs two blocks on the same input and sums them, for retrofitting memory layers.

``y = base(x) + add(x)`` (``init: zero`` / ``none``) or ``y = base(x) + scale · add(x)`` (``init: gate``),
``x, y: (B, T, dim)``. ``base`` is typically a pretrained layer's FFN and ``add`` a new memory block; both are
any registered blocks, each given as ``{block: name, **hyperparameters}`` (or just a name)::

    layers:
      2: {block: beside, base: {block: dense, hidden: 1536}, add: {block: product_key_memory, pool: shared}}

A retrofitted model starts exactly at its base model when the added branch outputs zero:

- ``init: zero`` (default): the model's init gives ``add`` a residual-output std of 0 (``init_weights(std, 0)``,
  e.g. Memory+'s ``W_2``, PKM's ``W_o``, dense ``down``), and the block checks on a probe input that ``add``'s
  output really is zero; a block whose output that does not zero (a PKM without output projection, a PEER on a
  shared pool) is rejected with a pointer to ``init: gate``.
- ``init: gate``: a learnable scalar ``scale`` starting at 0 multiplies ``add``'s output (any block); ``add``'s
  own parameters receive gradients once ``scale`` has moved.
- ``init: none``: both blocks keep the model's ordinary init (the model no longer starts at its base).

A child that names a pool (``pool: shared``) reads the pool the model hands this block; one pool per layer.
Cost: the sum of both blocks' (parameters, FLOPs); auxiliary losses of both are reported (``base.*``, ``add.*``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from memzoo.blocks.pool import MemoryPool
from memzoo.registry import create_block, get_block, register_block

BesideInit = Literal["zero", "gate", "none"]
BESIDE_INITS = ("zero", "gate", "none")


@register_block("beside")
class Beside(nn.Module):
    """``y = base(x) + add(x)`` (or ``+ scale · add(x)``); see the module docstring.

    Args:
        dim: model width.
        base: the first block, ``{block: name, **hyperparameters}`` or a block name (e.g. the pretrained FFN).
        add: the block added beside it, same form.
        init: ``zero`` | ``gate`` | ``none``: how the added branch starts (module docstring).
        pool: the shared :class:`MemoryPool` the model hands in for the child that names a pool.
    """

    def __init__(
        self,
        dim: int,
        base: dict[str, Any] | str = "dense",
        add: dict[str, Any] | str = "dense",
        init: BesideInit = "zero",
        pool: MemoryPool | None = None,
    ):
        super().__init__()
        if init not in BESIDE_INITS:
            raise ValueError(f"beside: init must be one of {BESIDE_INITS}, got {init!r}")
        self.dim = dim
        self.init = init
        self.base = _build_child("base", dim, base, pool)
        self.add = _build_child("add", dim, add, pool)
        self.scale = nn.Parameter(torch.zeros(())) if init == "gate" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        added = self.add(x)
        if self.scale is not None:
            added = self.scale.to(added.dtype) * added
        return self.base(x) + added

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init of both children; with ``init: zero`` the added branch's residual output std is 0."""
        if hasattr(self.base, "init_weights"):
            self.base.init_weights(std, residual_std)
        if self.init == "gate":
            nn.init.zeros_(self.scale)
            if hasattr(self.add, "init_weights"):
                self.add.init_weights(std, residual_std)
        elif self.init == "zero":
            if hasattr(self.add, "init_weights"):
                self.add.init_weights(std, 0.0)
            self._check_add_outputs_zero()
        elif hasattr(self.add, "init_weights"):
            self.add.init_weights(std, residual_std)

    @torch.no_grad()
    def _check_add_outputs_zero(self) -> None:
        probe = torch.randn(1, 3, self.dim, generator=torch.Generator().manual_seed(0))
        param = next(self.add.parameters(), None)
        if param is not None:
            probe = probe.to(param.device, param.dtype if param.is_floating_point() else probe.dtype)
        if param is not None and param.device.type == "meta":
            return
        out = self.add(probe)
        if bool(out.abs().max() > 0):
            raise ValueError(
                f"beside: init='zero' needs the added block {type(self.add).__name__} to output zeros once its "
                f"residual-output init std is 0 (init_weights(std, 0)), but it does not (e.g. a PKM without output "
                f"projection, a PEER on a shared pool); use init: gate (a scale starting at 0) instead"
            )

    def aux_losses(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, child in (("base", self.base), ("add", self.add)):
            if hasattr(child, "aux_losses"):
                out.update({f"{name}.{key}": value for key, value in child.aux_losses().items()})
        return out

    def active_parameters(self) -> int:
        """Parameters one token reads: both children's (their ``active_parameters()``, else all of theirs)."""
        return _active(self.base) + _active(self.add) + (0 if self.scale is None else 1)

    def flops_per_token(self) -> int:
        """Both children's FLOPs (a child without ``flops_per_token`` counts 2 per active parameter) + the sum."""
        total = self.dim
        for child in (self.base, self.add):
            total += int(child.flops_per_token()) if hasattr(child, "flops_per_token") else 2 * _active(child)
        return total

    def extra_repr(self) -> str:
        return f"init={self.init}"


def _build_child(role: str, dim: int, spec: Mapping[str, Any] | str, pool: MemoryPool | None) -> nn.Module:
    if isinstance(spec, str):
        spec = {"block": spec}
    if not isinstance(spec, Mapping) or "block" not in spec:
        raise ValueError(f"beside: {role} must be a block name or a mapping {{block: name, ...}}, got {spec!r}")
    args = dict(spec)
    name = args.pop("block")
    pool_name = args.get("pool")
    if isinstance(pool_name, str):
        if pool is None:
            raise ValueError(
                f"beside: {role} names pool {pool_name!r}, but no pool was handed in; build the block inside a "
                f"Transformer whose pools: define {pool_name!r}"
            )
        args["pool"] = pool
    if "pool" in args and "pool" not in inspect.signature(get_block(name).__init__).parameters:
        raise ValueError(f"beside: {role} block {name!r} does not read memory pools; drop `pool:`")
    try:
        child = create_block(name, dim=dim, **args)
    except (KeyError, ValueError) as err:
        raise ValueError(f"beside: {role}: {err}") from err
    if isinstance(pool_name, str) and isinstance(getattr(child, "block_spec", None), dict):
        child.block_spec["pool"] = pool_name  # the registry records the pool module as None
    return child


def _active(child: nn.Module) -> int:
    if hasattr(child, "active_parameters"):
        return int(child.active_parameters())
    return sum(p.numel() for p in {id(p): p for p in child.parameters()}.values())
