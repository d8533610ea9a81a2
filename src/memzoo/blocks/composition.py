"""``beside``: a block that runs two blocks on the same input and sums them, for retrofitting memory layers.

``y = base(x) + add(x)`` (``init: zero`` / ``base_scale`` / ``none``) or ``y = base(x) + scale · add(x)`` (``init: gate``),
``x, y: (B, T, dim)``. ``base`` is typically a pretrained layer's FFN and ``add`` a new memory block; both are
any registered blocks, each given as ``{block: name, **hyperparameters}`` (or just a name)::

    layers:
      2: {block: beside, base: {block: dense, hidden: 1536}, add: {block: memory_plus, pool: shared}}

A retrofitted model starts exactly at its base model when the added branch outputs zero:

- ``init: zero`` (default): the model's init gives ``add`` a residual-output std of 0 (``init_weights(std, 0)``,
  e.g. Memory+'s ``W_2``, PKM's ``W_o``, dense ``down``), and the block checks on a probe input that ``add``'s
  output really is zero; a block whose output that does not zero (a PKM with ``value_dim == dim``, which has no
  output projection; a PEER on a shared pool) is rejected with a pointer to ``init: gate``.
- ``init: base_scale``: for a branch added beside a *pretrained* block (``init_from``). Built as ``zero``; once
  the pretrained weights are loaded and the branch is new (the source lacks it), the branch is drawn again at the
  scale of the block beside it: ``add.init_weights(std, residual_std)`` with ``base.weight_scales()`` (a dense FFN:
  the std of its gate/up weights and of its down weights), then its output is zeroed again by ``add.zero_output()``
  (Memory+ / PKM: the pool's values become zero, ``W_1`` / ``W_2`` keep their weights). The model still starts
  exactly at its base, and the values get gradient at step 0 through an output projection of the FFN's scale.
  Why: ``zero`` draws the branch for unit-RMS inputs (``W_1`` ~ N(0, 0.02), ``W_2 = 0``); a pretrained model's
  FFN input can be far from that (SmolLM2-135M: RMS ~0.15, FFN weights std ~0.19), and after a short healing the
  branch's output stays ~100x below the FFN's, too small for updates of value rows alone (sparse memory
  finetuning) to move the logits. Needs a ``base`` with ``weight_scales`` (``dense``) and an ``add`` with
  ``zero_output`` (``product_key_memory`` and its presets); zeroing the values empties the whole pool, so the pool
  must be new as well.
- ``init: gate``: a learnable scalar ``scale`` starting at 0 multiplies ``add``'s output (any block); ``add``'s
  own parameters receive gradients once ``scale`` has moved.
- ``init: none``: both blocks keep the model's ordinary init (the model no longer starts at its base).

A child that names a pool (``pool: shared``) reads the pool the model hands this block (the layer's one pool,
``pool`` below); the child records the pool by its name.
Cost: the sum of both blocks' (parameters, FLOPs); auxiliary losses of both are reported (``base.*``, ``add.*``).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool
from memzoo.blocks.registry import BlockConfigError, block_entry, create_block, register_block

BesideInit = Literal["zero", "base_scale", "gate", "none"]
BESIDE_INITS = ("zero", "base_scale", "gate", "none")


@register_block(
    "beside",
    paper="retrofitting: a memory layer added beside a pretrained FFN (as the memory-layer retrofits of Berges et "
    "al. 2024 and Lin et al. 2025)",
    smallest={"base": {"block": "dense", "hidden": 16},
              "add": {"block": "memory_plus", "pool": "shared", "heads": 2, "knn": 2, "k_dim": 8},
              "init": "zero"},
    smallest_pools={"shared": {"n_keys": 4, "value_dim": 8}},
)
class Beside(Block):
    """``y = base(x) + add(x)`` (or ``+ scale · add(x)``); see the module docstring.

    Args:
        dim: model width.
        base: the first block, ``{block: name, **hyperparameters}`` or a block name (e.g. the pretrained FFN).
        add: the block added beside it, same form.
        init: ``zero`` | ``base_scale`` | ``gate`` | ``none``: how the added branch starts (module docstring).
        pool: the shared :class:`MemoryPool` the model hands in for the child that names a pool.
        vocab_size: the model's vocabulary size, handed on to a token-indexed child (e.g. ``engram``).
    """

    reads_pool = True  # through the child that names a pool
    needs_vocab_size = True  # for a token-indexed child; optional here

    def __init__(
        self,
        dim: int,
        base: dict[str, Any] | str = "dense",
        add: dict[str, Any] | str = "dense",
        init: BesideInit = "zero",
        pool: MemoryPool | None = None,
        vocab_size: int | None = None,
    ):
        super().__init__()
        if init not in BESIDE_INITS:
            raise ValueError(f"beside: init must be one of {BESIDE_INITS}, got {init!r}")
        self.dim = dim
        self.init = init
        self.base = _build_child("base", dim, base, pool, vocab_size)
        self.add = _build_child("add", dim, add, pool, vocab_size)
        self.scale = nn.Parameter(torch.zeros(())) if init == "gate" else None
        if init == "base_scale":
            if type(self.base).weight_scales is Block.weight_scales:  # not called: the weights may be on meta
                raise ValueError(f"beside: init='base_scale' reads the weight scales of base, but "
                                 f"{type(self.base).__name__} does not define weight_scales() (dense does)")
            if type(self.add).zero_output is Block.zero_output:
                raise ValueError(f"beside: init='base_scale' needs an added block that can zero its output without "
                                 f"zeroing its projections (zero_output(); product_key_memory can), not "
                                 f"{type(self.add).__name__}; use init: zero or gate")

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        added = self.add(x, ctx)
        if self.scale is not None:
            added = self.scale.to(added.dtype) * added
        return self.base(x, ctx) + added

    def prefetch(self, ctx: BlockContext) -> None:
        self.add.prefetch(ctx)
        self.base.prefetch(ctx)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init of both children; with ``init: zero`` the added branch's residual output std is 0."""
        self.base.init_weights(std, residual_std)
        starts_at_zero = self.init in ("zero", "base_scale")
        self.add.init_weights(std, 0.0 if starts_at_zero else residual_std)
        if self.scale is not None:
            nn.init.zeros_(self.scale)
        if starts_at_zero:
            self._check_add_outputs_zero()

    @torch.no_grad()
    def match_base_scale(self) -> None:
        """``init: base_scale`` once the base holds pretrained weights: the added branch drawn again at the base's
        weight scales, its output zeroed (module docstring). Called by ``init_from``'s loading for a new branch."""
        if self.init != "base_scale":
            raise ValueError(f"beside: match_base_scale is init='base_scale''s step, this block has init={self.init!r}")
        scales = self.base.weight_scales()
        if scales is None:
            raise ValueError(f"beside: init='base_scale': {type(self.base).__name__}.weight_scales() gave None")
        self.add.init_weights(*scales)
        self.add.zero_output()
        self._check_add_outputs_zero()

    @torch.no_grad()
    def _check_add_outputs_zero(self) -> None:
        probe = torch.randn(1, 3, self.dim, generator=torch.Generator().manual_seed(0))
        param = next(self.add.parameters(), None)
        if param is not None:
            probe = probe.to(param.device, param.dtype if param.is_floating_point() else probe.dtype)
        if param is not None and param.device.type == "meta":
            return
        out = self.add(probe, BlockContext.for_tokens(torch.zeros(1, 3, dtype=torch.int64, device=probe.device)))
        if bool(out.abs().max() > 0):
            raise ValueError(
                f"beside: init='zero' needs the added block {type(self.add).__name__} to output zeros once its "
                f"residual-output init std is 0 (init_weights(std, 0)), but it does not (e.g. a PKM without output "
                f"projection, a PEER on a shared pool); use init: gate (a scale starting at 0) instead"
            )

    def bind_tokenizer(self, tokenizer) -> None:
        """Both children get the data tokenizer."""
        self.base.bind_tokenizer(tokenizer)
        self.add.bind_tokenizer(tokenizer)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, child in (("base", self.base), ("add", self.add))
                for key, value in child.aux_losses().items()}

    def active_parameters(self) -> int:
        """Parameters one token reads: both children's and the gate's scale."""
        return self.base.active_parameters() + self.add.active_parameters() + (0 if self.scale is None else 1)

    def flops_per_token(self) -> int:
        """Both children's FLOPs + the sum (``dim``; the gate's product is not counted)."""
        return self.base.flops_per_token() + self.add.flops_per_token() + self.dim

    def table_bytes_read_per_token(self) -> int:
        return self.base.table_bytes_read_per_token() + self.add.table_bytes_read_per_token()

    def extra_repr(self) -> str:
        return f"init={self.init}"


def _build_child(role: str, dim: int, spec: Mapping[str, Any] | str, pool: MemoryPool | None,
                 vocab_size: int | None) -> Block:
    if isinstance(spec, str):
        spec = {"block": spec}
    if not isinstance(spec, Mapping) or "block" not in spec:
        raise ValueError(f"beside: {role} must be a block name or a mapping {{block: name, ...}}, got {spec!r}")
    args = dict(spec)
    name = args.pop("block")
    pool_name = args.get("pool")
    if isinstance(pool_name, str) and pool is None:
        raise ValueError(
            f"beside: {role} names pool {pool_name!r}, but no pool was handed in; build the block inside a "
            f"Transformer whose pools: define {pool_name!r}"
        )
    pools = {pool_name: pool} if isinstance(pool_name, str) else None
    try:
        if "vocab_size" in args and not block_entry(name).cls.needs_vocab_size:
            raise ValueError(f"beside: {role}: block {name!r} is not indexed by token ids; drop its vocab_size")
        child_vocab = args.pop("vocab_size", vocab_size)  # a child's own vocab_size wins over the model's
        return create_block(name, dim=dim, pools=pools, vocab_size=child_vocab, **args)
    except (KeyError, BlockConfigError) as err:
        raise ValueError(f"beside: {role}: {err}") from err
