"""The product-key memory layer (PKM / Memory+) against a plain materialising reference, pools, accounting, errors."""

import copy
import math

import pytest
import torch

import references
from memzoo.accounting import summarize
from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.pool import MemoryPool
from memzoo.model.summary import count_parameters
from memzoo.model.transformer import ModelConfigError, Transformer
from memzoo.registry import BlockConfigError, create_block

DIM, N_KEYS = 12, 6


reference_forward = references.product_key_memory


def make(dtype=torch.float64, **kw) -> ProductKeyMemory:
    args = dict(dim=DIM, heads=2, knn=3, k_dim=8, n_keys=N_KEYS)
    args.update(kw)
    block = ProductKeyMemory(**args).to(dtype)
    with torch.no_grad():  # non-trivial norm gains and biases, so their gradients are tested for real
        for name, p in block.named_parameters():
            if name.startswith("router.query_norm.") or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return block


def assert_matches_reference(block: ProductKeyMemory, x: torch.Tensor, zero_grads: tuple[str, ...] = ()) -> None:
    """Forward and the gradients of ``x`` and every parameter equal the reference's; each reference gradient is
    nonzero except those named in ``zero_grads`` (which must then be exactly zero in the block too)."""
    params = dict(block.named_parameters())
    x = x.detach().requires_grad_(True)
    out, ref = block(x), reference_forward(block, x)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    inputs = [x, *params.values()]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out, allow_unused=True)
    for name, g, r in zip(["x", *params], grads, ref_grads):
        assert g is not None and r is not None, f"no gradient for {name}"
        if name in zero_grads:
            assert not g.any() and not r.any(), f"{name} should get no gradient"
        else:
            assert r.abs().sum() > 0, f"reference gradient of {name} is zero: the test would not see a bug"
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"gradient of {name}: {m}")


# ---------------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("query_norm", ["none", "layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate", ["none", "silu"])
def test_matches_reference_forward_and_every_gradient(gate, query_norm, qk_norm, heads):
    block = make(gate=gate, query_norm=query_norm, qk_norm=qk_norm, heads=heads)
    assert_matches_reference(block, torch.randn(2, 5, DIM, dtype=torch.float64))


@pytest.mark.parametrize("gate", ["none", "silu"])
def test_knn_one_and_knn_equal_to_n_keys(gate):
    # one row per head: its softmax weight is 1, so scores (query, keys) get no gradient, nor x without a gate
    no_score_grads = ("router.query.weight", "router.query_norm.weight", "router.query_norm.bias", "router.sub_keys")
    no_grads = no_score_grads if gate == "silu" else ("x", *no_score_grads)
    block = make(gate=gate, knn=1, query_norm="layernorm")
    assert_matches_reference(block, torch.randn(3, 4, DIM, dtype=torch.float64), zero_grads=no_grads)
    assert_matches_reference(make(gate=gate, knn=N_KEYS), torch.randn(3, 4, DIM, dtype=torch.float64))


def test_projections_and_value_width():
    # PKM with value_dim != dim projects by W_o; at value_dim == dim it returns y itself; Memory+ always has W_2.
    narrow = make(value_dim=5)
    assert narrow.out_proj is not None and narrow.out_proj.in_features == 5
    assert_matches_reference(narrow, torch.randn(2, 3, DIM, dtype=torch.float64))
    assert make().out_proj is None
    assert_matches_reference(make(gate="silu", value_dim=7), torch.randn(2, 3, DIM, dtype=torch.float64))


def test_heads_reading_the_same_rows_add_up():
    # one sub-key set copied to both heads and identical query weights: both heads fetch the same rows
    block = make(heads=2, knn=2)
    with torch.no_grad():
        block.router.sub_keys[1] = block.router.sub_keys[0]
        block.router.query.weight[8:] = block.router.query.weight[:8]
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    indices, _ = block.lookup(x)
    assert torch.equal(indices[..., :2], indices[..., 2:])
    assert_matches_reference(block, x)
    # the output is twice that of a single head with the same keys: duplicates are summed
    one = make(heads=1, knn=2)
    with torch.no_grad():
        one.router.sub_keys.copy_(block.router.sub_keys[:1])
        one.router.query.weight.copy_(block.router.query.weight[:8])
        one.private_pool.values.copy_(block.pool.values)
    torch.testing.assert_close(block(x), 2 * one(x))


def test_lookup_returns_exact_top_knn_rows_and_normalised_weights():
    block = make(heads=2, knn=4)
    x = torch.randn(3, DIM, dtype=torch.float64)
    indices, weights = block.lookup(x)
    assert indices.shape == weights.shape == (3, 8) and indices.dtype == torch.int64
    torch.testing.assert_close(weights.view(3, 2, 4).sum(-1), torch.ones(3, 2, dtype=torch.float64))
    query = block.router.query(x).view(3, 2, 8)
    full = (query[..., None, :4] @ block.router.sub_keys[:, 0].transpose(-1, -2)).squeeze(-2)[..., :, None] + (
        query[..., None, 4:] @ block.router.sub_keys[:, 1].transpose(-1, -2)
    ).squeeze(-2)[..., None, :]
    expected = full.flatten(-2).topk(4, dim=-1).indices
    assert torch.equal(indices.view(3, 2, 4), expected)


def test_value_dropout_drops_weights_in_training_only():
    block = make(value_dropout=0.5, heads=2, knn=4)
    captured = {}
    block.value_dropout.register_forward_hook(lambda m, inp, out: captured.update(inp=inp[0], out=out))
    x = torch.randn(4, 6, DIM, dtype=torch.float64)
    block.train()
    out = block(x)
    dropped, kept = captured["out"] == 0, captured["out"] != 0
    assert dropped.any() and kept.any()
    torch.testing.assert_close(captured["out"][kept], captured["inp"][kept] / 0.5)
    torch.testing.assert_close(out, reference_forward(block, x, transform_weights=lambda w: captured["out"].flatten(-2)))
    block.eval()
    torch.testing.assert_close(block(x), reference_forward(block, x))


def test_float32_and_bfloat16_parameters_run():
    x = torch.randn(2, 3, DIM)
    block = make(dtype=torch.float32, gate="silu", query_norm="rmsnorm", qk_norm=True)
    torch.testing.assert_close(block(x), reference_forward(block, x), rtol=1e-4, atol=1e-5)
    half = make(dtype=torch.bfloat16, gate="silu")
    assert half(x.bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- pools
def test_two_layers_share_one_pool_and_their_gradients_add_up():
    pool = MemoryPool(N_KEYS, DIM).double()
    a, b = make(pool=pool, n_keys=None, gate="silu"), make(pool=pool, n_keys=None, heads=1)
    assert a.pool is pool and b.pool is pool
    assert not any("values" in name for name, _ in a.named_parameters())  # the pool is not the block's
    xa, xb = torch.randn(2, 4, DIM, dtype=torch.float64), torch.randn(2, 4, DIM, dtype=torch.float64)
    ga = torch.autograd.grad(a(xa).sum(), pool.values)[0]
    gb = torch.autograd.grad(b(xb).sum(), pool.values)[0]
    both = torch.autograd.grad(a(xa).sum() + b(xb).sum(), pool.values)[0]
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0
    torch.testing.assert_close(both, ga + gb)


def memory_model(update="dense", **kw):
    layer = dict(block="product_key_memory", pool="shared", heads=2, knn=3, k_dim=8)
    args = dict(
        vocab_size=40, dim=16, n_layers=3, n_heads=2, max_seq_len=32,
        layers={0: {**layer, "gate": "silu"}, 2: layer},
        pools={"shared": {"n_keys": N_KEYS, "value_dim": 16, "update": update}},
    )
    args.update(kw)
    return Transformer(**args)


def test_transformer_holds_a_shared_pool_once():
    model = memory_model()
    pool = model.pools["shared"]
    assert model.layers[0].ffn.pool is pool and model.layers[2].ffn.pool is pool
    value_keys = [k for k in model.state_dict() if k.endswith("values")]
    assert value_keys == ["pools.shared.values"]
    assert sum(p is pool.values for p in model.parameters()) == 1
    summary = summarize(model)
    rows = {r.name: r for r in summary.rows}
    assert summary.parameters == count_parameters(model)
    assert rows["layers.0.ffn"].parameters == count_parameters(model.layers[0].ffn)  # without the pool
    assert rows["layers.0.ffn"].active_parameters == model.layers[0].ffn.active_parameters()


def test_model_init_leaves_the_shared_pool_and_initialises_keys_and_projections():
    pool_values = memory_model().pools["shared"].values
    assert abs(pool_values.std().item() - 16**-0.5) < 0.02  # N(0, value_dim^-1/2), from the pool itself
    block = ProductKeyMemory(dim=256, heads=4, knn=4, k_dim=64, n_keys=N_KEYS, gate="silu")
    before = block.pool.values.detach().clone()
    block.init_weights(std=0.05, residual_std=0.005)
    assert torch.equal(block.pool.values, before)
    assert abs(block.router.query.weight.std().item() - 0.05) < 0.003
    assert abs(block.gate_proj.weight.std().item() - 0.05) < 0.003
    assert abs(block.out_proj.weight.std().item() - 0.005) < 0.0003
    assert abs(block.router.sub_keys.mean().item()) < 0.01  # N(0, (k_dim/2)^-1/2)
    assert abs(block.router.sub_keys.std().item() - 1 / math.sqrt(32)) < 0.01


@pytest.mark.parametrize("gate", ["none", "silu"])
def test_sparse_mode_gradients_equal_dense_mode(gate):
    dense = make(gate=gate, update="dense")
    sparse = copy.deepcopy(dense)
    sparse.private_pool.update = "sparse"
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    dense(x).square().sum().backward()
    sparse(x).square().sum().backward()
    assert sparse.pool.values.grad.is_sparse and not dense.pool.values.grad.is_sparse
    torch.testing.assert_close(sparse.pool.values.grad.to_dense(), dense.pool.values.grad)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        if "values" not in name:
            torch.testing.assert_close(q.grad, p.grad)


def test_sparse_gradients_of_layers_sharing_a_pool_accumulate():
    dense = memory_model("dense")
    sparse = copy.deepcopy(dense)
    sparse.pools["shared"].update = "sparse"
    ids = torch.randint(0, 40, (1, 3))  # 3 tokens × 2 layers × 2 heads × 3 rows: at most 36 reads, some repeat
    for model in (dense, sparse):
        model(ids).logsumexp(-1).sum().backward()
    grad = sparse.pools["shared"].values.grad
    assert grad.is_sparse
    rows_used = torch.unique(grad.coalesce().indices())
    assert 0 < rows_used.numel() < N_KEYS**2
    torch.testing.assert_close(grad.to_dense(), dense.pools["shared"].values.grad)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_torch_compile_of_a_transformer_with_memory_layers_matches_eager(update):
    # dense tables compile to one graph; a sparse table's gradient (dynamic row count) may break the graph
    torch._dynamo.reset()
    model = memory_model(update)
    compiled = torch.compile(model, fullgraph=update == "dense", backend="aot_eager")
    ids = torch.randint(0, 40, (2, 7))
    out = compiled(ids)
    out.logsumexp(-1).sum().backward()
    grad = model.pools["shared"].values.grad
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids)
    eager.logsumexp(-1).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert grad.is_sparse == (update == "sparse")
    for name, p in model.named_parameters():
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("gate", ["none", "silu"])
def test_cuda_layer_and_lazy_adam_step_match_cpu(gate):
    from memzoo.training.optim import LazyAdam

    cpu = make(dtype=torch.float32, gate=gate, query_norm="rmsnorm", qk_norm=True, update="sparse", knn=4)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 16, DIM)
    out, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_gpu.backward(grad_out.cuda())
    assert gpu.pool.values.grad.is_sparse
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        g, h = (t.grad.to_dense() if t.grad.is_sparse else t.grad for t in (p, q))
        torch.testing.assert_close(h.cpu(), g, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    step_cpu, step_gpu = LazyAdam([cpu.pool.values], lr=0.01), LazyAdam([gpu.pool.values], lr=0.01)
    step_cpu.step()
    step_gpu.step()
    torch.testing.assert_close(gpu.pool.values.detach().cpu(), cpu.pool.values.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- accounting
def test_active_parameters_and_flops_by_hand():
    pkm = ProductKeyMemory(dim=16, heads=2, knn=3, k_dim=8, n_keys=10, value_dim=6, query_norm="layernorm")
    # query 16·16=256, layernorm gain+bias 2·2·8=32, sub-keys 2·2·10·4=160, W_o 6·16=96, rows 2·3 · 6=36
    assert pkm.active_parameters() == 256 + 32 + 160 + 96 + 36
    # query 2·16·16=512, sub-key scores 2·2·10·8=320, candidate sums 2 heads · 5 pairs (3+1+1) = 10,
    # read 2·2·3·6=72, W_o 2·16·6=192
    assert pkm.flops_per_token() == 512 + 320 + 10 + 72 + 192
    plus = ProductKeyMemory(dim=16, heads=1, knn=2, k_dim=4, n_keys=3, gate="silu")
    # query 64, sub-keys 1·2·3·2=12, W_1 + W_2 2·256, rows 2·16
    assert plus.active_parameters() == 64 + 12 + 512 + 32
    # query 2·16·4=128, scores 2·3·4=24, candidate pairs (2+1) = 3, read 2·2·16=64, W_1 and W_2 2·2·16·16=1024
    assert plus.flops_per_token() == 128 + 24 + 3 + 64 + 1024
    tiny = ProductKeyMemory(dim=4, heads=4, knn=2, k_dim=2, n_keys=2)  # 8 lookups in a 4-row table
    assert tiny.active_parameters() == 4 * 8 + 4 * 2 * 2 * 1 + 4 * 4


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(knn=7), r"knn=7 exceeds n_keys=6"),
        (dict(k_dim=7), r"k_dim=7 must be even"),
        (dict(query_norm="groupnorm"), r"product_key_memory: unknown query_norm 'groupnorm'; choose one of .*'batchnorm'"),
        (dict(gate="relu"), r"unknown gate 'relu'; choose one of \['none', 'silu'\]"),
        (dict(heads=0), r"heads must be a positive int, got 0"),
        (dict(knn=0), r"knn must be a positive int"),
        (dict(value_dropout=1.0), r"value_dropout must be in \[0, 1\)"),
        (dict(n_keys=None), r"give either a shared `pool` or `n_keys`"),
        (dict(update="lazy"), r"pool update must be 'dense' or 'sparse'"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_flags_of_the_wrong_type_raise_clear_errors():
    with pytest.raises(TypeError, match=r"qk_norm must be true or false, got 'yes'"):
        make(qk_norm="yes")
    with pytest.raises(TypeError, match=r"product_key_memory: per_head_keys must be true or false, got 1"):
        make(per_head_keys=1)


def test_shared_pool_mismatches_raise_clear_errors():
    pool = MemoryPool(N_KEYS, DIM)
    with pytest.raises(ValueError, match=r"value_dim=5 differs from its shared pool's value_dim=12"):
        ProductKeyMemory(DIM, pool=pool, value_dim=5, k_dim=8, knn=2)
    with pytest.raises(ValueError, match=r"n_keys=4 differs from its shared pool's n_keys=6"):
        ProductKeyMemory(DIM, pool=pool, n_keys=4, k_dim=8, knn=2)
    with pytest.raises(ValueError, match=r"update='sparse' set\(s\) a private pool's options.*set them on the pool"):
        ProductKeyMemory(DIM, pool=pool, update="sparse", k_dim=8, knn=2)
    with pytest.raises(ValueError, match=r"knn=9 exceeds n_keys=6"):
        ProductKeyMemory(DIM, pool=pool, k_dim=8, knn=9)
    with pytest.raises(ValueError, match=r"needs a pool of kind 'memory'"):
        ProductKeyMemory(DIM, pool=MemoryPool(N_KEYS, DIM, kind="experts"), k_dim=8, knn=2)
    with pytest.raises(ValueError, match=r"pool 'shared' is a name"):
        ProductKeyMemory(DIM, pool="shared", k_dim=8, knn=2)


def test_registry_and_model_build_the_block_and_wrap_errors():
    block = create_block("product_key_memory", dim=DIM, n_keys=N_KEYS, knn=2, k_dim=8, gate="silu")
    assert isinstance(block, ProductKeyMemory) and block.gate == "silu"
    with pytest.raises(BlockConfigError, match=r"knn=9 exceeds n_keys=6"):
        create_block("product_key_memory", dim=DIM, n_keys=N_KEYS, knn=9, k_dim=8)
    with pytest.raises(BlockConfigError, match=r"unknown hyperparameter\(s\) 'topk'"):
        create_block("product_key_memory", dim=DIM, n_keys=N_KEYS, topk=2)
    with pytest.raises(ModelConfigError, match=r"layers.2: .*value_dim=8 differs from its shared pool"):
        memory_model(layers={2: dict(block="product_key_memory", pool="shared", knn=2, k_dim=8, value_dim=8)})
