"""The product-key router of product-key memory (PKM, Memory+) and PEER: ``x → (indices, weights)``.

Per token ``x (dim,)`` and head ``h`` of ``H``::

    q_h    = qnorm(W_q x)_h                                                     query, (k_dim,)
    s, I_h = top-knn over (i1, i2) of  q_h[:k_dim/2]·c1[i1] + q_h[k_dim/2:]·c2[i2]   product keys (Lample et al.)
    w_h    = softmax(s) | sigmoid(s)                                            weights of the knn rows, (knn,)

``c1, c2`` are the two sets of ``n_keys`` sub-keys, one pair of sets per head (``per_head_keys``) or one pair shared
by all heads (PEER's default); ``index = i1 · n_keys + i2`` addresses a table of ``n_keys²`` rows.

Options (each available to every block that routes by product keys):

- ``query_norm``: ``none`` (Memory+, with ``qk_norm``) | ``layernorm`` | ``rmsnorm`` (over each head's query
  features, gain and bias per head and coordinate: causal, the default of ``pkm`` and ``peer``) | ``batchnorm`` (over
  all ``B·T`` tokens, as Lample et al. and the PEER paper; **not causal in training**: a token's query is normalised
  with statistics of later tokens of the batch, and eval mode uses running statistics instead, so training and
  inference see slightly different functions; an explicit choice, for reproducing those papers).
- ``qk_norm``: scale-free scores as in qk-norm attention: each query half and each sub-key is RMS-normalised and
  their dot product divided by ``sqrt(k_dim/2)``, so each half score is ``sqrt(k_dim/2) · cosine``.
- ``score``: ``softmax`` over a head's ``knn`` scores (PKM, Memory+, PEER), or ``sigmoid`` of each score (the PEER
  paper's alternative router nonlinearity), computed in float32.
- ``per_head_keys``: each head has its own sub-keys (Lample et al., Memory+), or all heads share one set (PEER).

Initialisation: sub-keys ~ N(0, (k_dim/2)^-1/2), so a unit-variance query half scores with unit variance; the query
projection ~ N(0, std); norms at identity.

Cost per token (forward, a multiply-add counts 2): ``2·dim·H·k_dim`` (query) + ``2·H·n_keys·k_dim`` (both halves
against all sub-keys) + ``H·candidate_sums`` (additions of the top-k's candidate pairs).

The top-k is :func:`memzoo.ops.product_key_topk` (exact, ``candidate_pairs(knn)`` candidate sums per head).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memzoo.nn.norms import HeadNorm, at_least_float32, rms_normalize
from memzoo.ops.product_keys import candidate_pairs, product_key_topk

QUERY_NORMS = ("none", "layernorm", "rmsnorm", "batchnorm")
SCORES = ("softmax", "sigmoid")

def check_router_args(
    owner: str, n_keys: int, heads: int, knn: int, k_dim: int, per_head_keys: bool, query_norm: str, qk_norm: bool,
    score: str,
) -> None:
    """The checks of every block that routes by product keys (PKM, Memory+, PEER), each naming ``owner``, the
    argument, its bad value and the fix."""
    for name, value in (("n_keys", n_keys), ("heads", heads), ("knn", knn), ("k_dim", k_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if k_dim % 2:
        raise ValueError(
            f"{owner}: k_dim={k_dim} must be even (queries are split into two product-key halves); "
            f"use e.g. k_dim={k_dim + 1}"
        )
    if knn > n_keys:
        raise ValueError(
            f"{owner}: knn={knn} exceeds n_keys={n_keys} (top-k is taken per sub-key half); lower knn or raise n_keys"
        )
    for name, value, choices in (("query_norm", query_norm, QUERY_NORMS), ("score", score, SCORES)):
        if value not in choices:
            raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {list(choices)}")
    for name, value in (("qk_norm", qk_norm), ("per_head_keys", per_head_keys)):
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be true or false, got {value!r}")


class ProductKeyRouter(nn.Module):
    """Routes ``x (..., dim)`` to ``indices (..., H, knn)`` int64 rows in ``[0, n_keys²)`` and their
    ``weights (..., H, knn)`` (at least float32; softmax weights sum to 1 per head).

    Args:
        dim: input width.
        n_keys: sub-keys per half (the routed table has ``n_keys²`` rows).
        heads: query heads ``H``.
        knn: rows each head selects, ``1 <= knn <= n_keys``.
        k_dim: query width per head, even (two halves).
        per_head_keys: every head has its own sub-keys (else one set shared by all heads).
        query_norm, qk_norm, score: see the module docstring.
        bias: a bias on the query projection.
        owner: the block's name in argument errors (:func:`check_router_args`).

    Parameters: ``query`` (``nn.Linear``), ``query_norm`` (when not ``none``), ``sub_keys (S, 2, n_keys, k_dim/2)``
    with ``S = heads`` or ``1``.
    """

    def __init__(
        self,
        dim: int,
        n_keys: int,
        heads: int,
        knn: int,
        k_dim: int,
        *,
        per_head_keys: bool = True,
        query_norm: str = "none",
        qk_norm: bool = False,
        score: str = "softmax",
        bias: bool = False,
        owner: str = "product-key router",
    ):
        super().__init__()
        check_router_args(owner, n_keys, heads, knn, k_dim, per_head_keys, query_norm, qk_norm, score)
        self.dim, self.n_keys, self.heads, self.knn, self.k_dim = dim, n_keys, heads, knn, k_dim
        self.per_head_keys, self.query_norm_kind, self.qk_norm, self.score = per_head_keys, query_norm, qk_norm, score
        self.query = nn.Linear(dim, heads * k_dim, bias=bias)
        self.query_norm = _make_query_norm(query_norm, heads, k_dim)
        self.sub_keys = nn.Parameter(torch.empty(heads if per_head_keys else 1, 2, n_keys, k_dim // 2))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Sub-keys ~ N(0, (k_dim/2)^-1/2); query weight ~ N(0, std), bias 0; norms at identity."""
        nn.init.normal_(self.sub_keys, std=(self.k_dim // 2) ** -0.5)
        nn.init.normal_(self.query.weight, std=std)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()

    @torch.no_grad()
    def whiten_query(self, inputs: torch.Tensor, floor: float = 1e-3) -> None:
        """Draws the query projection again as ``W_q = R · M^{-1/2}`` for sample inputs ``inputs (N, dim)``: ``M``
        their (uncentred) second moment, eigenvalues floored at ``floor`` x their mean, ``R`` ~ N(0, s²) with
        ``s`` the projection's current std. Those inputs' queries then have the second moment ``R Rᵀ`` (about
        ``dim·s²·I``, as unit-RMS isotropic inputs under the ordinary init): no direction the inputs share
        dominates the scores, so tokens spread over the table's rows. Why: a pretrained model's hidden states share
        a large common component; projected at random, every token's query points the same way and reads the same
        few rows (SmolLM2-135M, layers 10 and 20: 1024 tokens read 3.6k / 2.7k of 16k rows, the 100 most read
        taking 40-49% of all reads; whitened: 16.3k rows, 2%). A bias, if any, becomes zero."""
        x = inputs.reshape(-1, inputs.shape[-1]).double()
        if x.shape[-1] != self.dim or len(x) < 2:
            raise ValueError(f"whiten_query needs inputs (N >= 2, dim={self.dim}), got {tuple(inputs.shape)}")
        weight = self.query.weight
        moment = x.T @ x / len(x)
        eigenvalues, vectors = torch.linalg.eigh(moment)
        eigenvalues = eigenvalues.clamp_min(float(eigenvalues.mean()) * floor)
        inverse_root = (vectors * eigenvalues.rsqrt()) @ vectors.T
        r = torch.randn(weight.shape, dtype=torch.float64, device=x.device) * float(weight.double().std())
        weight.copy_((r @ inverse_root).to(weight.dtype))
        if self.query.bias is not None:
            self.query.bias.zero_()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., dim)`` → normalised queries ``(..., H, k_dim)``, in the sub-keys' dtype."""
        q = self.query(x)
        # per feature, over every token of the batch; SyncBatchNorm: after Lightning's sync_batchnorm, over all ranks
        batch_norm = isinstance(self.query_norm, (nn.BatchNorm1d, nn.SyncBatchNorm))
        if batch_norm:
            q = self.query_norm(q.reshape(-1, q.shape[-1])).view(q.shape)
        q = q.unflatten(-1, (self.heads, self.k_dim))
        if self.query_norm is not None and not batch_norm:
            q = self.query_norm(q)
        return q.to(self.sub_keys.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, keys = self.queries(x), self.sub_keys
        if self.qk_norm:
            half = self.k_dim // 2  # each query half RMS-normalised and divided by sqrt(half), in one pass
            q = rms_normalize(q.unflatten(-1, (2, half)), scale=half**-0.5).flatten(-2)
            keys = rms_normalize(keys)
        if self.per_head_keys:
            scores, indices = product_key_topk(q, keys, self.knn)
        else:  # every head queries the one key set: a size-1 head axis of its own
            scores, indices = product_key_topk(q.unsqueeze(-2), keys, self.knn)
            scores, indices = scores.squeeze(-2), indices.squeeze(-2)
        scores = at_least_float32(scores)
        weights = scores.softmax(dim=-1) if self.score == "softmax" else scores.sigmoid()
        return indices, weights

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (module docstring), with :func:`memzoo.ops.candidate_pairs` ``(knn)`` candidate
        sums per head."""
        sums = candidate_pairs(self.knn)
        h = self.heads
        return 2 * self.dim * h * self.k_dim + 2 * h * self.n_keys * self.k_dim + h * sums

    def active_parameters(self) -> int:
        """Parameters every token reads: the query projection, its norm and ALL sub-keys (each is scored)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, knn={self.knn}, k_dim={self.k_dim}, n_keys={self.n_keys}, "
            f"per_head_keys={self.per_head_keys}, query_norm={self.query_norm_kind}, qk_norm={self.qk_norm}, "
            f"score={self.score}"
        )


def _make_query_norm(kind: str, heads: int, k_dim: int) -> nn.Module | None:
    if kind in ("layernorm", "rmsnorm"):
        return HeadNorm(heads, k_dim, kind)
    if kind == "batchnorm":
        return nn.BatchNorm1d(heads * k_dim)
    return None
