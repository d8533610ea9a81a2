"""The product-key router shared by PKM / Memory+ and PEER, against a plain reference that scores all ``n_keys²``
product keys (forward and gradients); memzoo's pruned top-k agrees with the top-k of all ``knn²`` candidate sums."""

import pytest
import torch

import references
from memzoo.nn.product_key_router import ProductKeyRouter
from memzoo.ops import product_key_topk

DIM, N_KEYS, K_DIM = 10, 6, 8


reference_router = references.route


def make(**kw) -> ProductKeyRouter:
    torch.manual_seed(0)
    args = dict(dim=DIM, n_keys=N_KEYS, heads=2, knn=3, k_dim=K_DIM)
    args.update(kw)
    router = ProductKeyRouter(**args).double()
    with torch.no_grad():  # affine parameters away from identity, so their gradients are tested
        for name, p in router.named_parameters():
            if name.startswith("query_norm.") or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return router


@pytest.mark.parametrize("per_head_keys", [True, False])
@pytest.mark.parametrize("query_norm", ["none", "layernorm", "rmsnorm", "batchnorm"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_matches_reference_forward_and_gradients(per_head_keys, query_norm, qk_norm, score):
    router = make(per_head_keys=per_head_keys, query_norm=query_norm, qk_norm=qk_norm, score=score, bias=True)
    x = torch.randn(2, 4, DIM, dtype=torch.float64, requires_grad=True)
    indices, weights = router(x)
    ref_indices, ref_weights = reference_router(router, x)
    assert indices.shape == weights.shape == (2, 4, 2, 3) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)
    grad = torch.randn_like(weights)
    inputs = [x, *router.parameters()]
    got = torch.autograd.grad(weights, inputs, grad)
    want = torch.autograd.grad(ref_weights, inputs, grad)
    for name, g, w in zip(["x", *(n for n, _ in router.named_parameters())], got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"gradient of {name}: {m}")


def plain_product_key_topk(query: torch.Tensor, sub_keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the top-k of all ``k²`` sums of the two half top-k lists."""
    half, n_keys = sub_keys.shape[-1], sub_keys.shape[2]
    best1, index1 = torch.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0]).topk(k, dim=-1)
    best2, index2 = torch.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1]).topk(k, dim=-1)
    scores, pair = (best1[..., :, None] + best2[..., None, :]).flatten(-2).topk(k, dim=-1)  # pair = a·k + b
    return scores, index1.gather(-1, pair // k) * n_keys + index2.gather(-1, pair % k)


def test_plain_and_pruned_top_k_agree_including_ties():
    torch.manual_seed(1)
    query = torch.randn(5, 3, 8, dtype=torch.float64)
    sub_keys = torch.randn(3, 2, 7, 4, dtype=torch.float64)
    sub_keys[:, 1, 3] = sub_keys[:, 1, 5]  # duplicate sub-keys: tied product-key scores
    for k in (1, 4, 7):
        s_plain, i_plain = plain_product_key_topk(query, sub_keys, k)
        s_fast, i_fast = product_key_topk(query, sub_keys, k)
        torch.testing.assert_close(s_fast, s_plain)
        full = (torch.einsum("bhd,hnd->bhn", query[..., :4], sub_keys[:, 0])[..., :, None]
                + torch.einsum("bhd,hnd->bhn", query[..., 4:], sub_keys[:, 1])[..., None, :]).flatten(-2)
        for indices in (i_plain, i_fast):  # each returned index scores what it claims (ties may swap indices)
            torch.testing.assert_close(full.gather(-1, indices), s_plain)


def test_flops_and_active_parameters_by_hand():
    router = ProductKeyRouter(dim=16, n_keys=10, heads=2, knn=3, k_dim=8, query_norm="layernorm")
    # query 2·16·16 = 512, halves against sub-keys 2·2·10·8 = 320, candidate sums 2·5 (pairs with (a+1)(b+1) <= 3)
    assert router.flops_per_token() == 512 + 320 + 2 * 5
    # query 16·16 = 256, layernorm gain+bias per head 2·2·8 = 32, per-head sub-keys 2·2·10·4 = 160
    assert router.active_parameters() == 256 + 32 + 160
    shared = ProductKeyRouter(dim=16, n_keys=10, heads=2, knn=3, k_dim=8, per_head_keys=False)
    assert shared.sub_keys.shape == (1, 2, 10, 4) and shared.active_parameters() == 256 + 80


@pytest.mark.parametrize("kwargs, message", [
    (dict(k_dim=7), "k_dim=7 must be even"),
    (dict(knn=7), "knn=7 exceeds n_keys=6"),
    (dict(query_norm="groupnorm"), "unknown query_norm 'groupnorm'"),
    (dict(score="relu"), "unknown score 'relu'"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)

