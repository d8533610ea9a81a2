"""The mixture-of-experts baseline: token-choice top-k routing over SwiGLU experts, dropless.

A linear router scores every token against ``n_experts`` experts; ``p = softmax(router(x))``; each token goes to
its ``top_k`` experts with weights ``p_e`` (optionally renormalised to sum to one over the chosen ``top_k``, as in
Mixtral), and the block outputs ``y = Σ_{e ∈ topk(x)} w_e · expert_e(x)``. Every expert is a
:class:`~memzoo.blocks.dense.DenseMLP` (SwiGLU). *Dropless*: no capacity limit, every routed token is processed.

Auxiliary losses (training forwards only; read them with :meth:`MoE.aux_losses`):

- load balancing (Switch Transformer, Fedus et al. 2021; GShard): ``n_experts · Σ_e f_e · P_e``, with ``f_e`` the
  fraction of the ``tokens · top_k`` assignments that go to expert ``e`` and ``P_e`` the mean router probability of
  ``e`` over the tokens. It equals 1 under perfectly uniform routing; gradients flow through ``P_e`` only.
- router z-loss (ST-MoE, Zoph et al. 2022): ``mean_tokens(logsumexp(router_logits)²)``, keeping logits small.

The dispatch is the readable yardstick, not a fast kernel: tokens are sorted by expert, each expert runs on its
own tokens (a Python loop over experts), and the weighted outputs are scattered back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.dense import DenseMLP, swiglu_hidden
from memzoo.blocks.registry import register_block


@register_block(
    "moe",
    paper="Jiang et al. 2024 (Mixtral: 8 SwiGLU experts, top-2, renormalised) with the load-balancing loss of "
    "Fedus et al. 2021 (Switch Transformer, weight 0.01)",
    smallest={"n_experts": 4, "top_k": 2, "hidden": 8},
)
class MoE(Block):
    """Top-k routed SwiGLU experts; ``x, y: (B, T, dim)``.

    Args:
        dim: model width.
        n_experts: number of experts.
        top_k: experts per token (``1 <= top_k <= n_experts``).
        hidden: each expert's SwiGLU inner width (``None``: the dense default, 8/3·dim rounded up to 64).
        renormalize: rescale the ``top_k`` chosen probabilities to sum to 1 (``False``: use them as they are).
        aux_loss_weight: weight of the load-balancing loss (0 disables it).
        z_loss_weight: weight of the router z-loss (0 disables it).
    """

    def __init__(
        self,
        dim: int,
        n_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        renormalize: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ):
        super().__init__()
        for name, value in (("n_experts", n_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"moe: {name} must be a positive int, got {value!r}")
        if top_k > n_experts:
            raise ValueError(
                f"moe: top_k={top_k} exceeds n_experts={n_experts}; a token can use at most every expert once"
            )
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"moe: hidden must be a positive int or null (dense default), got {hidden!r}")
        for name, value in (("aux_loss_weight", aux_loss_weight), ("z_loss_weight", z_loss_weight)):
            if not value >= 0:
                raise ValueError(f"moe: {name} must be >= 0, got {value!r}")
        self.dim = dim
        self.n_experts = n_experts
        self.top_k = top_k
        self.hidden = hidden or swiglu_hidden(dim)
        self.renormalize = renormalize
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(DenseMLP(dim, self.hidden) for _ in range(n_experts))
        self._aux: dict[str, torch.Tensor] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ forward
    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens (N, dim)`` → ``experts (N, top_k)`` int64 (most probable first), their ``weights (N, top_k)``
        and the ``router_logits (N, n_experts)``, both in at least float32."""
        logits = _at_least_float32(self.router(tokens))
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights, logits

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        tokens = x.reshape(-1, self.dim)  # (N, dim)
        experts, weights, logits = self.route(tokens)
        self._aux = self._auxiliary_losses(logits, experts) if self.training else {}
        return self._dispatch(tokens, experts, weights).view(x.shape)

    def _dispatch(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``y[n] = Σ_j weights[n, j] · expert_{experts[n, j]}(tokens[n])``; ``(N, dim)``."""
        assignment_expert = experts.reshape(-1)  # (N·top_k,): assignment a is token a // top_k
        order = assignment_expert.argsort(stable=True)  # assignments grouped by expert
        # per-expert counts of a fixed shape (n_experts,): bincount's length depends on the data, which a compiled
        # layer capturing dynamic output shapes could not turn into the split sizes below
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=experts.device)
        counts = counts.scatter_add_(0, assignment_expert, torch.ones_like(assignment_expert)).tolist()
        assignment_weight = weights.reshape(-1).to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for expert, assignments in zip(self.experts, order.split(counts), strict=True):
            if assignments.numel() == 0:
                continue
            token_ids = torch.div(assignments, self.top_k, rounding_mode="floor")
            y = expert(tokens[token_ids]) * assignment_weight[assignments, None]
            out.index_add_(0, token_ids, y)
        return out

    def _auxiliary_losses(self, logits: torch.Tensor, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {}
        if self.aux_loss_weight > 0:
            losses["load_balance"] = self.aux_loss_weight * load_balancing_loss(logits, experts, self.n_experts)
        if self.z_loss_weight > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits)
        return losses

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The weighted auxiliary losses of the last training forward (``{}`` after an eval forward or when both
        weights are 0): ``{"load_balance": scalar, "z_loss": scalar}``, each only if its weight is positive."""
        return dict(self._aux)

    # ------------------------------------------------------------------------------------------ init, accounting
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Router ~ N(0, std); each expert as a dense block (:meth:`DenseMLP.reset_parameters`; ``down`` is the
        residual output)."""
        nn.init.normal_(self.router.weight, std=std)
        for expert in self.experts:
            expert.reset_parameters(std, residual_std)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    def active_parameters(self) -> int:
        """Parameters one token reads: the router and ``top_k`` experts."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return self.router.weight.numel() + self.top_k * per_expert

    def table_bytes_read_per_token(self) -> int:
        """The weights of the ``top_k`` routed experts one token reads (what sets a decode step's memory traffic,
        the quantity lookup tables are compared on)."""
        expert = self.experts[0]
        return self.top_k * sum(p.numel() * p.element_size() for p in expert.parameters())

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (multiply-add = 2): router ``2·dim·n_experts`` + ``top_k`` SwiGLU experts
        ``top_k · 2·3·dim·hidden`` (softmax, top-k and the weighted sum are not counted)."""
        return 2 * self.dim * self.n_experts + self.top_k * self.experts[0].flops_per_token()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_experts={self.n_experts}, top_k={self.top_k}, hidden={self.hidden}, "
            f"renormalize={self.renormalize}, aux_loss_weight={self.aux_loss_weight}, "
            f"z_loss_weight={self.z_loss_weight}"
        )


def load_balancing_loss(router_logits: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss ``n_experts · Σ_e f_e · P_e`` (unweighted; 1 when routing is uniform).

    ``router_logits (N, n_experts)``, ``experts (N, top_k)`` the chosen experts. ``f_e`` = share of the
    ``N · top_k`` assignments given to ``e`` (no gradient), ``P_e`` = mean over tokens of ``softmax(logits)_e``.
    """
    router_logits = _at_least_float32(router_logits)
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts)
    assignment_share = counts.to(router_logits.dtype) / experts.numel()
    mean_probability = router_logits.softmax(dim=-1).mean(dim=0)
    return n_experts * (assignment_share * mean_probability).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_tokens(logsumexp(router_logits)²)`` (unweighted); ``router_logits (N, E)``."""
    return _at_least_float32(router_logits).logsumexp(dim=-1).square().mean()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Router arithmetic (softmax, logsumexp) in float32, or float64 for a float64 model."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
