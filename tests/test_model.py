"""The decoder: causality, attention against a plain reference, KV-cache decoding, layer specs, config errors."""

import pytest
import torch

from memzoo.accounting import summarize
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.pool import MemoryPool
from memzoo.model.attention import AttentionBackendError, CausalSelfAttention, reference_attention
from memzoo.model.config import ModelConfig
from memzoo.model.rope import RotaryEmbedding
from memzoo.model.summary import count_parameters
from memzoo.model.transformer import ModelConfigError, Transformer


def tiny(**kw):
    args = dict(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    args.update(kw)
    return Transformer(**args)


def test_changing_a_future_token_never_changes_past_logits():
    model = tiny().eval()
    ids = torch.randint(0, 50, (2, 16))
    base = model(ids)
    for t in (0, 7, 14):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_sdpa_attention_equals_plain_reference_forward_and_grads():
    attn = CausalSelfAttention(dim=32, n_heads=4, max_seq_len=32, backend="sdpa").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    y = attn(x)

    def reference(x):
        B, T, _ = x.shape
        q, k, v = attn.qkv(x).view(B, T, 3, 4, 8).unbind(2)
        q, k = attn.rope(q), attn.rope(k)
        out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return attn.proj(out.reshape(B, T, 32))

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_rope_preserves_norms_and_relative_positions():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=20)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(rope(q, 5).norm(), q.norm())
    dot = lambda a, b: (rope(q, a) * rope(k, b)).sum()  # noqa: E731
    torch.testing.assert_close(dot(3, 1), dot(10, 8), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_seq_len"):
        rope(torch.randn(1, 5, 1, 8), start_pos=18)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(head_dim=7, max_seq_len=4)


def test_kv_cache_decoding_matches_full_forward():
    model = tiny().eval()
    ids = torch.randint(0, 50, (3, 12))
    full = model(ids)
    caches = model.new_caches(3, 12)
    pieces = [model(ids[:, :5], caches), model(ids[:, 5:9], caches)]  # prefill, then a chunk after a prefix
    pieces += [model(ids[:, t : t + 1], caches) for t in range(9, 12)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_cached_equals_uncached_and_respects_eos():
    model = tiny().eval()
    prompt = torch.randint(0, 50, (2, 4))
    a = model.generate(prompt, 10, use_cache=True)
    b = model.generate(prompt, 10, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 14)
    first = int(a[0, 4])
    stopped = model.generate(prompt[:1], 10, eos_id=first)
    assert stopped.shape == (1, 5)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 6, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(sampled, a[:, :10])  # top-1 sampling is greedy


def test_layer_specs_merge_defaults_and_overrides():
    def specs(block_args, layers):
        return ModelConfig(n_layers=4, block="dense", block_args=block_args, layers=layers).layer_specs()

    got = specs({"hidden": 16}, {1: {"hidden": 32}, -1: {"block": "other", "x": 1}, "2": {"block": "dense"}})
    assert [s.block for s in got] == ["dense", "dense", "dense", "other"]
    assert got[0].args == {"hidden": 16} and got[1].args == {"hidden": 32}
    assert got[2].args == {"hidden": 16} and got[3].args == {"x": 1}
    with pytest.raises(ModelConfigError, match="index 4 is out of range for n_layers=4"):
        specs({}, {4: {}})
    with pytest.raises(ModelConfigError, match="not a layer index"):
        specs({}, {"first": {}})
    with pytest.raises(ModelConfigError, match="name the same layer"):
        specs({}, {3: {}, -1: {}})


def test_per_layer_blocks_are_built():
    model = tiny(n_layers=3, layers={1: {"hidden": 48}})
    assert [layer.ffn.hidden for layer in model.layers] == [128, 48, 128]
    assert all(isinstance(layer.ffn, DenseMLP) for layer in model.layers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=30, n_heads=4), "dim=30 is not divisible by n_heads=4"),
        (dict(dim=36, n_heads=4), "must be even for rotary"),
        (dict(block="dnse"), "Did you mean 'dense'"),
        (dict(block_args={"hiden": 3}), "did you mean 'hidden'"),
        (dict(layers={0: {"pool": "mem"}}), "pool 'mem' is not defined; defined pools: none"),
        (dict(pools={"mem": {"n_keys": 4, "value_dim": 32}}), r"pool\(s\) \['mem'\] are defined but no layer"),
        (dict(pools={"mem": {"n_key": 4}}), "unknown key.*n_key.*did you mean 'n_keys'"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(attention_backend="flash"), "attention_backend must be one of"),
    ],
)
def test_bad_model_configs_name_the_problem(kwargs, message):
    with pytest.raises((ModelConfigError, ValueError, KeyError), match=message):
        tiny(**kwargs)


def test_pool_on_a_block_that_reads_no_pool_is_rejected():
    with pytest.raises(ModelConfigError, match="does not read memory pools"):
        tiny(pools={"mem": {"n_keys": 4, "value_dim": 32}}, layers={0: {"pool": "mem"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_xformers_without_cuda_fails_clearly():
    with pytest.raises(AttentionBackendError, match="xformers cannot run: no CUDA device.*auto"):
        tiny(attention_backend="xformers")


def test_auto_backend_uses_sdpa_on_cpu_without_warnings(recwarn):
    model = tiny(attention_backend="auto")
    model(torch.randint(0, 50, (1, 4)))
    assert not [w for w in recwarn if "xformers" in str(w.message).lower()]


def test_tied_embeddings_and_init_scheme():
    model = tiny(n_layers=8)
    assert model.head.weight is model.embed.weight
    assert abs(model.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.003
    assert abs(model.layers[0].attn.proj.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(model.layers[0].ffn.down.weight.std().item() - 0.02 / 4) < 0.001
    untied = tiny(tie_embeddings=False)
    assert untied.head.weight is not untied.embed.weight


def test_parameter_summary_counts_once():
    model = tiny()
    summary = summarize(model)
    rows = {r.name: r for r in summary.rows}
    assert summary.parameters == count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert rows["layers.0.ffn"].parameters == rows["layers.0.ffn"].active_parameters == 3 * 32 * 128


def test_memory_pool_validates_and_initialises():
    pool = MemoryPool(n_keys=8, value_dim=16)
    assert pool.values.shape == (64, 16) and pool.num_rows == 64
    assert abs(pool.values.std().item() - 16**-0.5) < 0.05
    experts = MemoryPool(n_keys=4, value_dim=8, kind="experts", update="sparse")
    assert set(experts.tables()) == {"down", "up"} and experts.sparse
    for bad, msg in [(dict(n_keys=0), "n_keys"), (dict(kind="x"), "kind"), (dict(update="lazy"), "update"),
                     (dict(lr=-1.0), "lr"), (dict(weight_decay=-1.0), "weight_decay")]:
        with pytest.raises(ValueError, match=msg):
            MemoryPool(**{"n_keys": 4, "value_dim": 8, **bad})


def test_memory_pool_with_num_rows_is_a_directly_indexed_table():
    table = MemoryPool(None, 8, num_rows=37, update="sparse")
    assert table.values.shape == (37, 8) and table.num_rows == 37 and not table.product_keyed
    assert "rows=37," in table.extra_repr() and "n_keys" not in table.extra_repr()
    for bad in [dict(n_keys=4, num_rows=16), dict(n_keys=None), dict(n_keys=None, num_rows=0),
                dict(n_keys=None, num_rows=True)]:
        with pytest.raises(ValueError, match="num_rows|n_keys"):
            MemoryPool(value_dim=8, **bad)
    # product-key blocks refuse a table without the n_keys² layout, naming the fix
    with pytest.raises(ValueError, match="num_rows=16 and no n_keys"):
        ProductKeyMemory(16, pool=MemoryPool(None, 16, num_rows=16), k_dim=8, knn=2)
