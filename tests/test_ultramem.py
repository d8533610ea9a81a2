"""UltraMem / UltraMemV2 against float64 references written from the papers' equations (plain loops), the Tucker
top-k against brute force, skip-layer placement (``add_at``) and the value lr multiplier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memzoo.blocks import UltraMem, UltraMemV2
from memzoo.blocks.pool import MemoryPool
from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.transformer import Transformer
from memzoo.ops.tucker_topk import tucker_topk
from memzoo.training.optim import build_optimizer

DIM = 12


# ----------------------------------------------------------------------------------------------- references
def ref_layer_norm(v, gain):
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return (v - mean) / torch.sqrt(var + 1e-5) * gain


def ref_rank1(core_sum):
    u, _, vh = torch.linalg.svd(core_sum)
    u, v = u[:, 0], vh[0, :]
    return (-u, -v) if u.sum() < 0 else (u, v)


def ref_select(rows, cols, cores, knn, m):
    """One query and head: rows, cols (n, r), cores (M, r, r) -> [(cell, per-core scores (M,))] best first."""
    n = rows.shape[0]
    u, v = ref_rank1(cores.detach().sum(0))
    best_i = sorted(range(n), key=lambda i: -float(rows[i].detach() @ u))[:m]
    best_j = sorted(range(n), key=lambda j: -float(cols[j].detach() @ v))[:m]
    cells = []
    for i in best_i:
        for j in best_j:
            per_core = torch.stack([rows[i] @ core @ cols[j] for core in cores])
            cells.append((i * n + j, per_core))
    cells.sort(key=lambda c: -float(c[1].detach().sum()))
    return cells[:knn]


def ref_slots(block, x):
    """Per token of x (dim,): [(row, group, per-core scores)] from the router's equations."""
    r = block.router
    q = r.query.weight @ x
    q1, q2 = ref_layer_norm(q[: r.k_dim], r.query_norm), ref_layer_norm(q[r.k_dim :], r.query_norm)
    slots = []
    for h in range(r.heads):
        rows = torch.stack([torch.stack([q1 @ ref_layer_norm(r.keys[h, 0, i, a], r.key_norm) for a in range(r.rank)])
                            for i in range(r.n_keys)])
        cols = torch.stack([torch.stack([q2 @ ref_layer_norm(r.keys[h, 1, j, b], r.key_norm) for b in range(r.rank)])
                            for j in range(r.n_keys)])
        for cell, per_core in ref_select(rows, cols, r.cores[h], r.knn, r.candidates):
            slot = int(r.permutation[cell])
            slots.append((slot % r.physical_rows, slot // r.physical_rows, per_core))
    return slots


def ref_read(block, table, slots, gates=None):
    """``W_o`` applied to the grouped, core-chunked sums (the module docstring's equation)."""
    E, M, D = block.value_expand, block.n_cores, block.value_dim
    acc = [[torch.zeros(D // M, dtype=table.dtype) for _ in range(M)] for _ in range(E)]
    for k, (row, group, per_core) in enumerate(slots):
        g = group if E > 1 else 0
        for c in range(M):
            weight = per_core[c] * (1.0 if gates is None else gates[k])
            acc[g][c] = acc[g][c] + weight * table[row, c * (D // M) : (c + 1) * (D // M)]
    return block.out.weight @ torch.cat([chunk for group in acc for chunk in group])


def ref_ultramem(block, x):
    return torch.stack([ref_read(block, block.pool.values, ref_slots(block, t)) for t in x])


def ref_ultramem_v2(block, x):
    out = []
    for t in x:
        slots = ref_slots(block, t)
        z = block.value_in.weight @ t
        gates = [block.pool.down[row] @ z for row, _, _ in slots]
        gates = [F.gelu(g) for g in gates] if block.activation == "gelu" else gates
        y = ref_read(block, block.pool.up, slots, gates)
        f = block.ffn
        out.append(y + f.down.weight @ (F.silu(f.gate.weight @ t) * (f.up.weight @ t)))
    return torch.stack(out)


def perturbed(block, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block.double()


# ----------------------------------------------------------------------------------------------- tucker top-k
@pytest.mark.parametrize("m", [2, 5])
def test_tucker_topk_equals_candidate_brute_force_forward_and_grad(m):
    torch.manual_seed(0)
    rows = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    cores = torch.rand(3, 2, 2, dtype=torch.float64, requires_grad=True)  # M = 3 cores
    scores, indices = tucker_topk(rows, cols, cores, knn=4, candidates=m)
    ref_scores = []
    for b in range(3):
        cells = ref_select(rows[b], cols[b], cores, 4, m)
        assert indices[b].tolist() == [c for c, _ in cells]
        ref_scores.append(torch.stack([s for _, s in cells]))
    ref_scores = torch.stack(ref_scores)
    torch.testing.assert_close(scores, ref_scores)
    w = torch.randn_like(scores)
    grads = torch.autograd.grad((scores * w).sum(), (rows, cols, cores))
    ref_grads = torch.autograd.grad((ref_scores * w).sum(), (rows, cols, cores))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_tucker_topk_with_all_candidates_is_the_exact_top_k():
    torch.manual_seed(1)
    rows, cols = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    cores = torch.randn(2, 3, 3, dtype=torch.float64)  # full rank: the rank-1 candidates alone would miss cells
    _, indices = tucker_topk(rows, cols, cores, knn=5, candidates=6)
    full = torch.einsum("zia,cab,zjb->zij", rows, cores, cols).flatten(1)
    assert torch.equal(indices, full.topk(5, dim=-1).indices)


def test_tucker_topk_errors_name_the_value():
    rows = torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match="candidates=5"):
        tucker_topk(rows, rows, torch.rand(1, 2, 2), knn=2, candidates=5)
    with pytest.raises(ValueError, match="knn=10"):
        tucker_topk(rows, rows, torch.rand(1, 2, 2), knn=10, candidates=3)


# ----------------------------------------------------------------------------------------------- blocks
def _grads(out, params, w):
    return torch.autograd.grad((out * w).sum(), params)


@pytest.mark.parametrize("value_expand,candidates,update", [(4, 3, "dense"), (1, 2, "dense"), (4, 3, "sparse")])
def test_ultramem_matches_float64_reference_forward_and_grad(value_expand, candidates, update):
    """Dense and row-sparse tables, one projection and four (rows in several groups of one token)."""
    block = perturbed(UltraMem(DIM, n_keys=4, value_dim=6, value_expand=value_expand, value_rows=4, heads=2, knn=3,
                               k_dim=4, rank=2, cores=2, candidates=candidates, update=update))
    x = torch.randn(5, DIM, dtype=torch.float64, requires_grad=True)
    out = block(x)
    ref = ref_ultramem(block, x)
    torch.testing.assert_close(out, ref)
    params = [x, block.router.query.weight, block.router.keys, block.router.cores, block.router.query_norm,
              block.pool.values, block.out.weight]
    w = torch.randn_like(out)
    for got, want in zip(_grads(out, params, w), _grads(ref, params, w)):
        torch.testing.assert_close(got.to_dense() if got.is_sparse else got, want)


@pytest.mark.parametrize("update,cores,value_expand", [("dense", 3, 4), ("sparse", 3, 4), ("sparse", 1, 1)])
def test_the_read_costs_what_flops_per_token_says(update, cores, value_expand):
    """Each of the K rows is read once (2·K·D), whatever the groups, cores and update mode."""
    from torch.utils.flop_counter import FlopCounterMode

    block = UltraMem(DIM, n_keys=4, value_dim=6, value_expand=value_expand, heads=2, knn=3, k_dim=4, cores=cores,
                     update=update)
    K, D = 6, 6
    assert block._read_flops() == 2 * K * D
    # the op's cost counted from what it is handed: 2 per multiply-add over every (position, column)
    formulas = {torch.ops.memzoo.grouped_weighted_gather:
                lambda values, indices, *_, **__: 2 * indices.numel() * values[1]}
    rows, groups, scores = block.router(torch.randn(5, DIM))
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        block.grouped_read(block.pool.values, rows, groups, scores)
    assert counter.get_total_flops() == 5 * block._read_flops()


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_ultramem_v2_matches_float64_reference_forward_and_grad(activation):
    block = perturbed(UltraMemV2(DIM, n_keys=4, value_dim=6, value_rows=8, heads=1, knn=4, k_dim=4, cores=3,
                                 activation=activation, ffn_fraction=0.25))
    x = torch.randn(4, DIM, dtype=torch.float64, requires_grad=True)
    out = block(x)
    ref = ref_ultramem_v2(block, x)
    torch.testing.assert_close(out, ref)
    params = [x, block.router.keys, block.router.cores, block.pool.down, block.pool.up, block.value_in.weight,
              block.ffn.gate.weight]
    w = torch.randn_like(out)
    for got, want in zip(_grads(out, params, w), _grads(ref, params, w)):
        torch.testing.assert_close(got, want)


def test_duplicate_rows_add_up():
    """Two grid slots mapped to the same physical row (one row, 4 slots) both contribute."""
    block = perturbed(UltraMem(DIM, n_keys=2, value_dim=4, value_expand=1, value_rows=1, heads=1, knn=4, k_dim=4,
                               candidates=2))
    x = torch.randn(3, DIM, dtype=torch.float64)
    torch.testing.assert_close(block(x), ref_ultramem(block, x))


def test_ffn_fraction_sets_the_dense_width_and_zero_removes_it():
    assert UltraMemV2(64, n_keys=4, value_dim=8, k_dim=4, knn=2, ffn_fraction=0.5).ffn.hidden == 96  # 192 / 2
    assert UltraMemV2(64, n_keys=4, value_dim=8, k_dim=4, knn=2, ffn_fraction=0).ffn is None


@pytest.mark.parametrize("kwargs,match", [
    ({"value_expand": 3}, "value_expand=3"),
    ({"value_dim": 5}, "value_dim=5 must be a multiple of cores=2"),
    ({"candidates": 9}, "candidates=9 exceeds n_keys=4"),
    ({"knn": 20, "candidates": 4}, "knn=20 exceeds candidates"),
    ({"n_keys": None}, "give either a shared `pool` or `n_keys`"),
])
def test_bad_settings_name_the_value_and_the_fix(kwargs, match):
    args = {"n_keys": 4, "value_dim": 8, "k_dim": 4, "knn": 2, "value_expand": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        UltraMem(DIM, **args)


def test_shared_pool_gives_the_grid_side():
    pool = MemoryPool(None, 8, num_rows=16, lr=None, lr_scale=4.0)
    block = UltraMem(DIM, pool=pool, value_expand=4, k_dim=4, knn=2)
    assert block.n_keys == 8 and not block.owns_pool
    with pytest.raises(ValueError, match="not a square"):
        UltraMem(DIM, pool=MemoryPool(None, 8, num_rows=10), value_expand=4, k_dim=4, knn=2)


# ----------------------------------------------------------------------------------------------- value lr multiplier
def test_value_lr_scale_reaches_the_optimizer_group():
    model = UltraMem(DIM, n_keys=4, value_dim=8, k_dim=4, knn=2, value_lr_scale=4.0)
    optimizer = build_optimizer(model, lambda groups: torch.optim.AdamW(groups, lr=3e-4))
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["private_pool"] == pytest.approx(1.2e-3) and lrs["decay"] == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="lr_scale"):
        MemoryPool(None, 8, num_rows=4, lr_scale=0)


# ----------------------------------------------------------------------------------------------- skip-layer placement
SKIP = {"n_keys": 4, "value_dim": 8, "k_dim": 4, "knn": 2, "heads": 1}


def skip_model(add_at=2):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=258, dim=16, n_layers=3, n_heads=2, max_seq_len=16,
                                   layers={0: {"block": "ultramem", **SKIP, "add_at": add_at}})).eval()


def test_add_at_adds_the_block_output_after_the_later_layer():
    model = skip_model()
    ids = torch.randint(0, 258, (2, 7))
    from memzoo.blocks.base import BlockContext

    ctx = BlockContext.for_tokens(ids)
    with torch.no_grad():
        x = model.embed(ids)
        layer0 = model.layers[0]
        x = x + layer0.attn(layer0.attn_norm(x), None, None, None)
        memory = layer0.ffn(layer0.ffn_norm(x), ctx)  # read at layer 0 ...
        for layer in model.layers[1:]:
            x = x + layer.attn(layer.attn_norm(x), None, None, None)
            x = x + layer.ffn(layer.ffn_norm(x), ctx)
        x = x + memory  # ... added after layer 2
        want = model.head(model.norm(x))
        torch.testing.assert_close(model(ids), want)


def test_add_at_decodes_with_the_kv_cache_as_recomputation():
    model = skip_model(add_at=-1)
    prompt = torch.randint(0, 258, (2, 4))
    cached = model.generate(prompt, max_new_tokens=5)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, use_cache=False))


@pytest.mark.parametrize("add_at,match", [(0, "must name a later layer"), (3, "must name a later layer"),
                                          ("1", "must be a layer index")])
def test_bad_add_at_is_refused(add_at, match):
    with pytest.raises(ModelConfigError, match=match):
        skip_model(add_at)
    with pytest.raises(ModelConfigError, match="per-layer setting"):
        ModelConfig(n_layers=2, block_args={"add_at": 1}).layer_specs()


def test_add_at_survives_the_hf_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memzoo.export.hf import export_model

    model = skip_model(add_at=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "hf", tokenizer="byte"),
                                                           trust_remote_code=True)
    ids = torch.randint(0, 258, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_a_sharded_or_host_table_is_refused_by_name():
    """UltraMem reads its table directly: a memory-parallel read or a host table would be bypassed, so
    both are refused with the fix instead of reading the wrong columns or the wrong device."""
    block = UltraMem(DIM, n_keys=2, value_dim=4, value_expand=1, value_rows=1, heads=1, knn=4, k_dim=4, candidates=2)
    x = torch.randn(3, DIM)
    block.pool.shard_reads(lambda values, indices, weights: None)
    with pytest.raises(NotImplementedError, match="memory-parallel.*table_device: accelerator"):
        block(x)
    block.pool.shard_reads(None)
    block(x)
    host = UltraMem(DIM, pool=MemoryPool(None, 8, num_rows=16, table_device="host"), value_expand=4, k_dim=4, knn=2)
    with pytest.raises(NotImplementedError, match="host-resident"):
        host(x)


def test_memory_parallelism_refuses_ultramem_by_layer():
    from memzoo.parallel.memory_parallel import MemoryParallelError, check_memory_parallel

    model = Transformer(ModelConfig(vocab_size=32, dim=DIM, n_layers=2, n_heads=2, max_seq_len=8,
                                    layers={1: {"block": "ultramem", "n_keys": 4, "value_dim": 8, "k_dim": 4,
                                                "knn": 2, "heads": 1}}))
    with pytest.raises(MemoryParallelError, match=r"layers\.1\.ffn \(UltraMem\) indexes its table directly.*ddp"):
        check_memory_parallel(model, 1, 1)


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_compiled_block_matches_eager_through_the_grouped_read(update):
    """``torch.compile(fullgraph=True)`` traces the grouped read (a custom op with a fake implementation; a sparse
    table's backward has a data-dependent row count): output and every gradient as in eager mode."""
    torch.manual_seed(0)
    block = UltraMem(DIM, n_keys=4, value_dim=6, value_expand=4, value_rows=4, heads=2, knn=3, k_dim=4, cores=2,
                     candidates=3, update=update)
    x = torch.randn(2, 5, DIM)
    eager = block(x)
    eager.pow(2).sum().backward()
    want = {name: p.grad.to_dense().clone() for name, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True)(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad.to_dense(), want[name], rtol=1e-4, atol=1e-6, msg=name)
