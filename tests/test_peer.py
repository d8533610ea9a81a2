"""PEER against a plain materialising reference: exact top-k over all n_keys² product keys, gathered expert
vectors ``(..., heads, k, dim)``, einsums. Forward and every gradient, in float64."""

from __future__ import annotations

import re

import pytest
import torch

import references
from memzoo.blocks.peer import PEER
from memzoo.blocks.pool import MemoryPool
from memzoo.model.transformer import Transformer
from memzoo.registry import BlockConfigError, create_block

DIM, N_KEYS, K_DIM = 12, 6, 8  # 36 experts


# ---------------------------------------------------------------------------------------------- reference
reference_peer = references.peer


# ---------------------------------------------------------------------------------------------- helpers
def make_peer(seed: int = 0, **kw) -> PEER:
    torch.manual_seed(seed)
    args = dict(n_keys=N_KEYS, heads=2, knn=3, k_dim=K_DIM, query_norm="layernorm")
    args.update(kw)
    peer = PEER(DIM, **args).double()
    with torch.no_grad():  # non-trivial norm affine, so its gradients are tested too
        for name, p in peer.named_parameters():
            if name.startswith("router.query_norm."):
                p.add_(0.1 * torch.randn_like(p))
    return peer


def check_against_reference(peer: PEER, x: torch.Tensor) -> None:
    # memzoo's RMSNorm computes in float32 whatever the input dtype; everything else runs in float64 here
    rtol, atol = (1e-5, 1e-7) if peer.router.query_norm_kind == "rmsnorm" else (1e-9, 1e-11)
    x_block = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    grad_out = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    params = [p for p in peer.parameters()]
    y = peer(x_block)
    block_grads = torch.autograd.grad(y, [x_block, *params], grad_out, allow_unused=True)
    y_ref = reference_peer(peer, x_ref)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *params], grad_out, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    names = ["x"] + [n for n, _ in peer.named_parameters()]
    for name, got, want in zip(names, block_grads, ref_grads, strict=True):
        assert want is not None, name
        got = got.to_dense() if got.is_sparse else got
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"gradient of {name} differs")


def random_input(seed: int = 1, shape=(2, 5, DIM)) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- forward + grads
@pytest.mark.parametrize("per_head_keys", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("k", [1, 4])
def test_matches_reference_keys_scores_heads_k(per_head_keys, score, heads, k):
    peer = make_peer(per_head_keys=per_head_keys, score=score, heads=heads, knn=k)
    check_against_reference(peer, random_input())


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "rmsnorm", "none"])
def test_matches_reference_activations_and_norms(activation, query_norm):
    peer = make_peer(activation=activation, query_norm=query_norm, per_head_keys=True)
    check_against_reference(peer, random_input())


def test_batchnorm_eval_uses_running_statistics():
    peer = make_peer(query_norm="batchnorm")
    for seed in range(3):  # move the running statistics away from (0, 1)
        peer(random_input(seed) * 2 + 1)
    peer.eval()
    assert not torch.allclose(peer.router.query_norm.running_mean, torch.zeros_like(peer.router.query_norm.running_mean))
    check_against_reference(peer, random_input(5))


def test_k_equal_to_n_keys_and_single_token():
    peer = make_peer(knn=N_KEYS, query_norm="rmsnorm")
    check_against_reference(peer, random_input(shape=(1, 1, DIM)))


def test_routes_to_exact_top_k_of_all_product_keys():
    peer = make_peer(heads=3, knn=5, per_head_keys=True)
    x = random_input()
    indices, weights = peer.router(x)
    ref_indices, ref_weights = references.route(peer.router, x)
    assert indices.shape == (2, 5, 3, 5) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 3, dtype=torch.float64))


def test_heads_retrieving_the_same_experts_add_up():
    """Identical query heads pick identical experts: every expert index appears twice per token."""
    peer = make_peer(heads=2, knn=4, query_norm="layernorm")
    with torch.no_grad():
        w = peer.router.query.weight.view(2, K_DIM, DIM)
        w[1] = w[0]
        for p in peer.router.query_norm.parameters():  # per-head gains and biases: head 1 = head 0
            p[1] = p[0]
    x = random_input()
    indices, _ = peer.router(x)
    assert torch.equal(indices[..., 0, :], indices[..., 1, :])
    check_against_reference(peer, x)
    single = make_peer(heads=1, knn=4, query_norm="layernorm")
    with torch.no_grad():
        single.router.query.weight.copy_(peer.router.query.weight[:K_DIM])
        for mine, theirs in zip(single.router.query_norm.parameters(), peer.router.query_norm.parameters()):
            mine.copy_(theirs[:1])
        single.router.sub_keys.copy_(peer.router.sub_keys)
        single.pool.down.copy_(peer.pool.down)
        single.pool.up.copy_(peer.pool.up)
    torch.testing.assert_close(peer(x), 2 * single(x))


def test_sparse_pool_gives_row_sparse_gradients_equal_to_dense():
    torch.manual_seed(0)
    pool = MemoryPool(N_KEYS, DIM, kind="experts", update="sparse").double()
    peer = PEER(DIM, pool=pool, heads=2, knn=3, k_dim=K_DIM, query_norm="layernorm").double()
    x = random_input()
    peer(x).square().sum().backward()
    assert pool.down.grad.is_sparse and pool.up.grad.is_sparse
    used = pool.down.grad.coalesce().indices().numel()
    assert 0 < used <= 2 * 5 * 2 * 3
    dense_grads = {n: g.to_dense().clone() for n, g in (("down", pool.down.grad), ("up", pool.up.grad))}
    pool.down.grad = pool.up.grad = None
    reference_peer(peer, x).square().sum().backward()
    torch.testing.assert_close(dense_grads["down"], pool.down.grad)
    torch.testing.assert_close(dense_grads["up"], pool.up.grad)


def test_batchnorm_query_is_not_causal_in_training_but_is_in_eval():
    """The documented caveat: in training, BatchNorm's batch statistics let later tokens change earlier outputs."""
    peer = make_peer(query_norm="batchnorm", knn=4)
    x = random_input(shape=(1, 6, DIM))
    changed_future = x.clone()
    changed_future[0, -1] += 5.0
    assert not torch.allclose(peer(x)[0, 0], peer(changed_future)[0, 0])
    peer.eval()
    torch.testing.assert_close(peer(x)[0, :-1], peer(changed_future)[0, :-1])
    causal = make_peer(query_norm="layernorm", knn=4)
    torch.testing.assert_close(causal(x)[0, :-1], causal(changed_future)[0, :-1])


# ---------------------------------------------------------------------------------------------- shared pool
def _shared_pool_model(pools: dict, layer_pools: tuple[str, str]) -> Transformer:
    peer_args = dict(block="peer", heads=2, knn=3, k_dim=K_DIM, query_norm="layernorm")
    torch.manual_seed(0)
    return Transformer(
        vocab_size=17, dim=16, n_layers=3, n_heads=2,
        layers={0: {**peer_args, "pool": layer_pools[0]}, 2: {**peer_args, "pool": layer_pools[1]}},
        pools=pools, max_seq_len=16,
    ).double()


def test_two_peer_layers_share_one_pool_in_a_transformer():
    shared = _shared_pool_model({"experts": {"kind": "experts", "n_keys": 5, "value_dim": 16}}, ("experts",) * 2)
    tables = [k for k in shared.state_dict() if k.endswith((".down", ".up"))]
    assert tables == ["pools.experts.down", "pools.experts.up"]
    assert shared.layers[0].ffn.pool is shared.layers[2].ffn.pool is shared.pools["experts"]

    # the same weights with two separate copies of the table: the shared table's gradient is their sum
    split = _shared_pool_model(
        {name: {"kind": "experts", "n_keys": 5, "value_dim": 16} for name in ("a", "b")}, ("a", "b")
    )
    state = shared.state_dict()
    for name in ("a", "b"):
        for table in ("down", "up"):
            state[f"pools.{name}.{table}"] = state[f"pools.experts.{table}"]
    del state["pools.experts.down"], state["pools.experts.up"]
    split.load_state_dict(state)

    ids = torch.randint(0, 17, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shared(ids), split(ids))
    shared(ids).logsumexp(-1).sum().backward()
    split(ids).logsumexp(-1).sum().backward()
    for table in ("down", "up"):
        grad_a, grad_b = getattr(split.pools["a"], table).grad, getattr(split.pools["b"], table).grad
        assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
        torch.testing.assert_close(getattr(shared.pools["experts"], table).grad, grad_a + grad_b)


def test_model_init_leaves_shared_pool_and_sets_private_pool():
    peer = PEER(DIM, n_keys=N_KEYS, heads=2, knn=3, k_dim=K_DIM)
    peer.init_weights(std=0.02, residual_std=0.001)
    assert abs(peer.pool.down.std().item() - 0.02) < 0.004
    assert abs(peer.pool.up.std().item() - 0.001) < 0.0002
    assert abs(peer.router.query.weight.std().item() - 0.02) < 0.004
    pool = MemoryPool(N_KEYS, DIM, kind="experts", init_std=0.5)
    before = pool.down.detach().clone()
    PEER(DIM, pool=pool, heads=2, knn=3, k_dim=K_DIM).init_weights(std=0.02, residual_std=0.001)
    assert torch.equal(pool.down, before)


# ---------------------------------------------------------------------------------------------- accounting
def test_active_parameters_and_flops_by_hand():
    peer = PEER(dim=16, n_keys=10, heads=2, knn=3, k_dim=8, query_norm="layernorm")
    # query 16·(2·8)=256, layernorm weight+bias per head 2·2·8=32, sub-keys 1·2·10·4=80,
    # experts 2·3 rows · (16 down + 16 up)=192
    assert peer.active_parameters() == 256 + 32 + 80 + 192
    # query 2·16·16=512, half scores 2·2·10·8=320, candidate sums 2 heads · 5 pairs (3+1+1) = 10,
    # experts 4·2·3·16=384
    assert peer.flops_per_token() == 512 + 320 + 10 + 384
    per_head = PEER(dim=16, n_keys=10, heads=2, knn=3, k_dim=8, query_norm="none", per_head_keys=True)
    assert per_head.active_parameters() == 256 + 0 + 160 + 192
    assert per_head.flops_per_token() == peer.flops_per_token()


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"knn": 7}, "knn=7 exceeds n_keys=6"),
        ({"activation": "tanh"}, "unknown activation 'tanh'"),
        ({"score": "relu"}, "unknown score 'relu'"),
        ({"query_norm": "groupnorm"}, "unknown query_norm 'groupnorm'"),
        ({"k_dim": 7}, "k_dim=7 must be even"),
        ({"heads": 0}, "heads must be a positive int"),
        ({"knn": 0}, "knn must be a positive int"),
        ({"n_keys": None}, "give either a shared `pool` or `n_keys`"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    args = dict(n_keys=N_KEYS, heads=2, knn=3, k_dim=K_DIM)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        PEER(DIM, **args)


def test_pool_width_must_equal_model_dim():
    pool = MemoryPool(N_KEYS, DIM + 4, kind="experts")
    with pytest.raises(ValueError, match="value_dim=16, but PEER experts map dim -> dim with dim=12; set the pool"):
        PEER(DIM, pool=pool)


def test_pool_must_hold_experts():
    with pytest.raises(ValueError, match="needs a pool of kind 'experts'"):
        PEER(DIM, pool=MemoryPool(N_KEYS, DIM, kind="memory"))


def test_registry_builds_peer_and_wraps_errors():
    assert isinstance(create_block("peer", dim=DIM, n_keys=N_KEYS, heads=1, knn=2, k_dim=4), PEER)
    with pytest.raises(BlockConfigError, match="unknown activation 'tanh'"):
        create_block("peer", dim=DIM, n_keys=N_KEYS, activation="tanh")


def test_reports_its_lookups_to_a_usage_observer():
    class Recorder:
        def __init__(self):
            self.calls = []

        def update(self, indices, weights):
            self.calls.append((indices, weights))

    peer = make_peer(heads=2, knn=3)
    recorder = Recorder()
    peer.pool.track_usage(recorder)
    x = random_input()
    peer(x)
    (indices, weights), = recorder.calls
    ref_indices, ref_weights = references.route(peer.router, x)
    assert torch.equal(indices, ref_indices.flatten(-2))
    torch.testing.assert_close(weights, ref_weights.flatten(-2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_float32_matches_reference_on_device(device, update):
    """float32 against the materialising reference on the same device (on CUDA: the Triton kernels behind the ops;
    one device, so CPU/GPU rounding cannot flip a near-tie in the expert selection)."""
    torch.manual_seed(0)
    pool = MemoryPool(16, 64, kind="experts", update=update).to(device)
    peer = PEER(64, pool=pool, heads=4, knn=8, k_dim=32, query_norm="layernorm").to(device)
    x = torch.randn(3, 33, 64, device=device)
    tensors = (*peer.parameters(), pool.down, pool.up)

    def forward_backward(forward):
        for p in tensors:
            p.grad = None
        xg = x.clone().requires_grad_(True)
        y = forward(xg)
        y.square().sum().backward()
        return [y.detach(), xg.grad] + [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in tensors]

    got = forward_backward(peer)
    want = forward_backward(lambda xg: reference_peer(peer, xg))
    names = ["y", "x"] + [n for n, _ in peer.named_parameters()] + ["down", "up"]
    for name, g, w in zip(names, got, want, strict=True):
        tolerance = {"rtol": 1e-4, "atol": 1e-5 * (1 + w.abs().max().item())}
        torch.testing.assert_close(g, w, **tolerance, msg=lambda message, name=name: f"{name}: {message}")


def test_reset_parameters_restores_the_norms():
    for kind in ("batchnorm", "layernorm", "rmsnorm"):
        peer = make_peer(query_norm=kind)  # make_peer perturbs the norm's affine parameters
        peer(random_input())
        peer.reset_parameters()
        for name, p in peer.router.query_norm.named_parameters():
            assert torch.equal(p, torch.ones_like(p) if name == "weight" else torch.zeros_like(p)), (kind, name)
        if kind == "batchnorm":
            assert torch.equal(peer.router.query_norm.running_mean, torch.zeros_like(peer.router.query_norm.running_mean))
