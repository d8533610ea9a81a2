"""The dense baseline: a SwiGLU MLP (Shazeer, 2020), the FFN of LLaMA-style decoders."""

from __future__ import annotations

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.registry import register_block
from memzoo.nn.activations import swiglu


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """Default SwiGLU width: 8/3·dim (same parameters as a 4·dim GELU MLP), rounded up to ``multiple_of``."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register_block(
    "dense", paper="Shazeer 2020, 'GLU Variants Improve Transformer' (SwiGLU, as LLaMA)", smallest={"hidden": 16}
)
class DenseMLP(Block):
    """``y = W_down( silu(W_gate x) ⊙ W_up x )``; ``x, y: (B, T, dim)``.

    Args:
        dim: model width.
        hidden: inner width (``None``: 8/3·dim rounded up to a multiple of 64).
        dropout: dropout on the output (as nanoGPT's MLP).
        bias: add biases to the three projections (as GPT-2 / nanoGPT's ``bias=True``).
    """

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if hidden is not None and hidden < 1:
            raise ValueError(f"dense hidden must be a positive int or null, got {hidden!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dense dropout must be in [0, 1), got {dropout!r}")
        self.dim = dim
        self.hidden = hidden or swiglu_hidden(dim)
        self.gate = nn.Linear(dim, self.hidden, bias=bias)
        self.up = nn.Linear(dim, self.hidden, bias=bias)
        self.down = nn.Linear(self.hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        return self.dropout(self.down(swiglu(self.gate(x), self.up(x))))

    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """``gate``/``up`` ~ N(0, std), the residual output ``down`` ~ N(0, residual_std), biases 0."""
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.up.weight, std=std)
        nn.init.normal_(self.down.weight, std=residual_std)
        for lin in (self.gate, self.up, self.down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    @torch.no_grad()
    def weight_scales(self) -> tuple[float, float]:
        """``(std of gate and up weights, std of down weights)``: the scales :meth:`init_weights` would give."""
        inputs = torch.cat([self.gate.weight.flatten(), self.up.weight.flatten()]).float()
        return float(inputs.std()), float(self.down.weight.float().std())

    def flops_per_token(self) -> int:
        """Forward multiply-adds ×2 per token: three ``dim × hidden`` matmuls."""
        return 2 * 3 * self.dim * self.hidden
