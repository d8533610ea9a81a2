"""Plain, materialising float64 references shared by the tests: the definitions, not the implementations.

- :func:`weighted_gather`, :func:`gather_dot`: the sparse ops, through the explicit ``(..., K, D)`` gathered rows.
- :func:`route`: the product-key router, scoring ALL ``n_keys²`` product keys of every head, each query norm
  written out by hand.
- :func:`product_key_memory`, :func:`peer`: the two blocks on top of :func:`route`, gathering rows explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weighted_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[..., :] = Σ_j weights[..., j] · values[indices[..., j]]`` via the ``(..., K, D)`` gathered rows."""
    return (weights.unsqueeze(-1) * values[indices]).sum(-2)


def gather_dot(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = values[indices[..., j]] · x[...]`` via the ``(..., K, D)`` gathered rows."""
    return (values[indices] * x.unsqueeze(-2)).sum(-1)


def _layer_norm(v: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    centred = v - v.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


def _unit_rms(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def route(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`memzoo.nn.ProductKeyRouter`'s ``(indices, weights) (..., H, knn)``, from the full product set."""
    heads, k_dim, half = router.heads, router.k_dim, router.k_dim // 2
    q = F.linear(x, router.query.weight, router.query.bias)
    norm, kind = router.query_norm, router.query_norm_kind
    if kind == "batchnorm":  # per feature over all tokens (training) or running statistics (eval)
        flat = q.reshape(-1, q.shape[-1])
        mean, var = (flat.mean(0), flat.var(0, unbiased=False)) if norm.training else (norm.running_mean, norm.running_var)
        q = (q - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    q = q.unflatten(-1, (heads, k_dim))
    if kind == "layernorm":
        q = _layer_norm(q, norm.weight, norm.bias, norm.eps)
    elif kind == "rmsnorm":
        q = _unit_rms(q, norm.eps) * norm.weight
    keys = router.sub_keys.expand(heads, -1, -1, -1)  # (H, 2, n_keys, half)
    q1, q2, c1, c2 = q[..., :half], q[..., half:], keys[:, 0], keys[:, 1]
    if router.qk_norm:  # each half score = sqrt(half) · cosine
        q1, q2, c1, c2 = _unit_rms(q1) / math.sqrt(half), _unit_rms(q2) / math.sqrt(half), _unit_rms(c1), _unit_rms(c2)
    full = (torch.einsum("...hd,hnd->...hn", q1, c1)[..., :, None]
            + torch.einsum("...hd,hnd->...hn", q2, c2)[..., None, :]).flatten(-2)  # (..., H, n²), index i1·n + i2
    scores, indices = full.topk(router.knn, dim=-1)
    return indices, scores.softmax(-1) if router.score == "softmax" else scores.sigmoid()


def product_key_memory(block, x: torch.Tensor, transform_weights=None) -> torch.Tensor:
    """PKM / Memory+: ``y = Σ_h Σ_j w_hj · V[I_hj]`` over explicitly gathered rows, then the gate and projection.
    ``transform_weights`` (optional) edits the ``(..., H·knn)`` weights (e.g. value dropout)."""
    indices, weights = route(block.router, x)
    weights = weights.flatten(-2)
    if transform_weights is not None:
        weights = transform_weights(weights)
    y = weighted_gather(block.pool.values, indices.flatten(-2), weights)
    if block.gate == "silu":
        y = y * F.silu(F.linear(x, block.gate_proj.weight, block.gate_proj.bias))
    if block.out_proj is not None:
        y = F.linear(y, block.out_proj.weight, block.out_proj.bias)
    return y


def peer(block, x: torch.Tensor) -> torch.Tensor:
    """PEER: ``y = Σ_h Σ_i g_hi · act(u_i · x) · v_i`` over the explicitly gathered ``(..., H, knn, dim)`` experts."""
    indices, weights = route(block.router, x)
    down, up = block.pool.down[indices], block.pool.up[indices]
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[block.activation]
    hidden = act(torch.einsum("...hkd,...d->...hk", down, x))
    return torch.einsum("...hk,...hkd->...d", weights * hidden, up)
