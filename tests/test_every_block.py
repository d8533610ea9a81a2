"""Every registered block and preset passes one shared test (as timm tests every registered model).

For each name of ``memzoo blocks``, a tiny two-layer Transformer with that block in both FFN slots (built from the
name's declared ``smallest`` settings and pools, so a shared pool is read by both layers): forward shapes, finite
gradients, causality in training mode (attention included), ``memzoo summary`` parameters and FLOPs against a
count measured by ``torch.utils.flop_counter``, a state-dict round trip, ``torch.compile(backend="aot_eager")``
equal to eager, the export loaded by plain ``transformers`` with equal logits, and KV-cache generation equal to
recomputation. A new block gets all of it by being registered (with ``smallest=`` settings if its defaults are big).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memzoo.accounting import summarize
from memzoo.blocks import PEER, DenseMLP, MoE, ProductKeyMemory
from memzoo.blocks.base import BlockContext
from memzoo.model.config import ModelConfig
from memzoo.model.summary import count_parameters
from memzoo.model.transformer import Transformer
from memzoo.ops import candidate_pairs
from memzoo.ops import tucker_topk as tucker_topk_module
from memzoo.parallel import parallelize
from memzoo.registry import block_entry, list_blocks

NAMES = list_blocks()
VOCAB, DIM, T = 258, 16, 8  # the byte tokenizer's vocabulary, so the export can ship it

#: FLOP formulas of memzoo's custom ops for FlopCounterMode (it counts aten matmuls itself, but not those inside a
#: custom op): a weighted read of K rows of width D, or K dot products of width D, is 2·K·D per bag; the product-key
#: top-k's half scores are 2 · n_keys · Dk multiply-adds per query and head.
FLOP_FORMULAS = {
    torch.ops.memzoo.weighted_gather: lambda values, indices, weights, *args, **kw: 2 * indices[0] * indices[1]
    * values[1],
    torch.ops.memzoo.gather_dot: lambda values, indices, x, *args, **kw: 2 * indices[0] * indices[1] * values[1],
    # each position's row read once, whole (a weight per chunk), into its group
    torch.ops.memzoo.grouped_weighted_gather: lambda values, indices, *args, **kw: 2 * indices[0] * indices[1]
    * values[1],
    # the half scores: every (T, H) query half against its n_keys sub-keys of width Dk/2, both halves
    torch.ops.memzoo.product_key_topk: lambda query, sub_keys, k, *args, **kw: 2 * query[0] * query[1] * query[2]
    * sub_keys[2],
    # UltraMem's kept cells: each of the Q·K cells' r² outer-product terms against every core (what the PyTorch
    # path's matmul (Q, K, r²) @ (r², M) counts)
    torch.ops.memzoo.tucker_cell_scores: lambda rows, cols, cores, i, j, *args, **kw: 2 * i[0] * i[1] * cores[1]
    * cores[2] * cores[3],
}
#: Declared FLOPs may exceed the measured count by what FlopCounterMode does not see: the sums of product-key
#: candidate pairs (``heads · candidate_pairs(knn)``, counted by the blocks) and Beside's residual sum; nothing else.
FLOP_RTOL = 0.02


def tiny_config(name: str) -> ModelConfig:
    entry = block_entry(name)
    return ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=2, max_seq_len=24, block=name,
                       block_args=dict(entry.smallest), pools={k: dict(v) for k, v in entry.smallest_pools.items()})


@functools.cache
def tiny_model(name: str) -> Transformer:
    """The name's tiny Transformer, with every parameter moved off its init (a zero-initialised branch, e.g.
    ``beside``'s added block, then takes part in every check)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(name))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def token_ids(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``name -> export folder``, each exported once (on first use)."""
    from memzoo.export.hf import export_model

    root, folders = tmp_path_factory.mktemp("every_block"), {}

    def get(name: str):
        if name not in folders:
            folders[name] = export_model(tiny_model(name), root / name, tokenizer="byte")
        return folders[name]

    return get


def test_every_builtin_block_and_preset_is_tested():
    assert {"dense", "moe", "peer", "pkm", "memory_plus", "product_key_memory", "beside", "engram"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite_gradients(name):
    model = tiny_model(name)
    ids = token_ids()
    block = model.layers[0].ffn
    x = torch.randn(2, T, DIM)
    assert block(x, BlockContext.for_tokens(ids)).shape == x.shape
    model.train()
    try:
        logits = model(ids)
        assert logits.shape == (2, T, VOCAB) and logits.dtype == torch.float32
        loss = logits.logsumexp(-1).mean() + sum(model.aux_losses().values(), torch.zeros(()))
        loss.backward()
    finally:
        model.eval()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
        assert torch.isfinite(grad).all(), f"{name}: {pname} has a non-finite gradient"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_causal_in_training_mode(name):
    """The output at position t does not change when tokens after t change (dropout is 0, so training mode is
    deterministic; batch statistics, as BatchNorm's, would break this)."""
    model, t = tiny_model(name), 4
    ids = token_ids(batch=3)
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(T - t - 1)) % VOCAB
    model.train()
    try:
        with torch.no_grad():
            before, after = model(ids), model(changed)
    finally:
        model.eval()
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


@pytest.mark.parametrize("name", NAMES)
def test_summary_parameters_and_flops_match_a_measured_count(name, monkeypatch):
    # UltraMem's Tucker selection runs the same multiply-adds in a C++ kernel the counter cannot see: count its
    # PyTorch path
    monkeypatch.setattr(tucker_topk_module, "_kernel_takes", lambda *args: False)
    model = tiny_model(name)
    summary = summarize(model, context_length=T)
    assert summary.parameters == count_parameters(model) == sum(p.numel() for p in model.parameters())
    rows = {row.name: row for row in summary.rows}
    for i, layer in enumerate(model.layers):
        block, row = layer.ffn, rows[f"layers.{i}.ffn"]
        assert row.parameters == count_parameters(block)
        assert 0 < row.active_parameters <= count_parameters(block) + sum(
            count_parameters(pool) for pool in model.pools.values())
        x, ids = torch.randn(2, T, DIM), token_ids()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            block(x, BlockContext.for_tokens(ids))
        measured = counter.get_total_flops() / (2 * T)
        assert not row.flops_estimated, f"{name} does not count its own FLOPs"
        assert measured <= row.flops <= measured * (1 + FLOP_RTOL), (name, row.flops, measured)
    # the declared excess is what the counter cannot see (candidate sums; beside's residual sum)
    block = model.layers[0].ffn
    if isinstance(block, (DenseMLP, MoE)):
        assert rows["layers.0.ffn"].flops == measured
    elif isinstance(block, (ProductKeyMemory, PEER)):
        assert rows["layers.0.ffn"].flops - measured == block.heads * candidate_pairs(block.knn)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, tmp_path):
    model = tiny_model(name)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(123)
    fresh = Transformer(tiny_config(name)).eval()
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compile_aot_eager_equals_eager(name):
    """Compiled as ``memzoo fit --model.compile`` compiles it (:func:`memzoo.parallel.parallelize`: each layer in place,
    dynamic output shapes captured; shared pools with sparse updates), outputs and every gradient equal eager's."""
    config = tiny_config(name)
    config.pools = {key: {**pool, "update": "sparse"} for key, pool in config.pools.items()}
    eager, compiled, weights = Transformer(config), Transformer(config), tiny_model(name).state_dict()
    eager.load_state_dict(weights)
    compiled.load_state_dict(weights)
    torch._dynamo.reset()
    parallelize(compiled, compile="aot_eager")
    ids = token_ids()
    outs, grads = [], []
    for model in (eager, compiled):
        out = model(ids)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
    torch._dynamo.reset()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert grads[1].keys() == grads[0].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_plain_transformers_with_equal_logits(name, exports):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports(name), trust_remote_code=True)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    # transformers' own generate, with its cache, continues as memzoo's decode loop does
    prompt = token_ids(length=5)
    eos = hf.generation_config.eos_token_id  # both stop a row at it and pad finished rows with it
    greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         pad_token_id=eos)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=4, eos_id=eos))


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_generation_equals_recomputation(name):
    model = tiny_model(name)
    prompt = token_ids(length=5)
    cached = model.generate(prompt, max_new_tokens=6, use_cache=True)
    recomputed = model.generate(prompt, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, recomputed)
    # the logits of a cached decode (prefix, then one token at a time) equal one full forward
    with torch.no_grad():
        full = model(cached)
        caches = model.new_caches(2, cached.shape[1])
        steps = [model(cached[:, :5], caches)]
        steps += [model(cached[:, i : i + 1], caches) for i in range(5, cached.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
