"""Engram against a plain float64 reference written from the paper's equations (hash rows in plain Python ints,
concatenated head rows, the gate, a looped causal convolution), forward and every gradient; its compressed
vocabulary against the ``tokenizers`` library's normalizers (the authors' sequence); KV-cache decoding with n-gram
windows across the cache boundary; the table controls; the tokenizer reaching the block; bad input."""

from __future__ import annotations

import math

import pytest
import torch

import memzoo
from memzoo.blocks.base import BlockContext
from memzoo.blocks.engram import Engram
from memzoo.blocks.engram_vocab import (
    compressed_vocabulary,
    hash_multipliers,
    is_prime,
    normalize_token_text,
    table_primes,
)
from memzoo.data.tokenizers import ByteTokenizer, HFTokenizer
from memzoo.model.transformer import Transformer
from memzoo.registry import BlockConfigError, create_block

DIM, VOCAB = 12, 40
SMALL = dict(max_ngram=3, ngram_dim=6, heads=2, table_rows=[7, 13], kernel_size=3)


def make_engram(seed: int = 0, **kw) -> Engram:
    torch.manual_seed(seed)
    block = Engram(DIM, vocab_size=VOCAB, **{**SMALL, **kw}).double()
    with torch.no_grad():  # every parameter off its init (zero conv, unit norms), so each gradient is tested
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


# ---------------------------------------------------------------------------------------------- reference
def reference_rows(block: Engram, ids: list[list[int]], history: list[list[int]] | None = None) -> list:
    """Rows per (b, t) as plain Python ints: compressed ids, pad before the start, XOR of id · multiplier."""
    lookup, pad = block.lookup.tolist(), int(block.pad_id)
    mult, primes, offsets = block.multipliers.tolist(), block.primes.tolist(), block.row_offsets.tolist()
    n_max = block.max_ngram
    out = []
    for b, row in enumerate(ids):
        before = history[b] if history is not None else [pad] * (n_max - 1)
        seq = list(before) + [lookup[i] for i in row]
        rows_b = []
        for t in range(len(row)):
            pos = t + n_max - 1
            rows_t = []
            for n in range(2, n_max + 1):
                mix = 0
                for k in range(n):
                    mix ^= seq[pos - k] * mult[k]
                for h in range(block.heads):
                    j = (n - 2) * block.heads + h
                    rows_t.append(mix % primes[j] + offsets[j])
            rows_b.append(rows_t)
        out.append(rows_b)
    return out


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_engram(block: Engram, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The paper's equations with plain tensor ops: e_t = ‖ E[z], α = σ(ssqrt(q·k/√d)), ṽ = α v,
    y = ṽ + SiLU(conv(RMSNorm(ṽ))) with a looped causal dilated depthwise convolution."""
    rows = reference_rows(block, ids.tolist())
    table = block.pool.values
    B, T, _ = x.shape
    e = torch.stack([torch.stack([torch.cat([table[r] for r in rows[b][t]]) for t in range(T)]) for b in range(B)])
    k = rms(e @ block.key_proj.weight.T + block.key_proj.bias, block.key_norm.weight, block.key_norm.eps)
    q = rms(x, block.query_norm.weight, block.query_norm.eps)
    s = torch.einsum("btd,btd->bt", q, k)[..., None] / math.sqrt(DIM)
    alpha = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6)))
    v = alpha * (e @ block.value_proj.weight.T + block.value_proj.bias)
    c = rms(v, block.conv_norm.weight, block.conv_norm.eps)
    w = block.conv.weight[:, 0, :]  # (dim, kernel)
    K, d = block.kernel_size, block.dilation
    conv = []
    for t in range(T):
        acc = torch.zeros(B, DIM, dtype=x.dtype)
        for j in range(K):
            src = t - (K - 1 - j) * d
            if src >= 0:
                acc = acc + w[:, j] * c[:, src]
        conv.append(acc)
    return v + torch.nn.functional.silu(torch.stack(conv, dim=1))


def token_ids(shape=(2, 9), seed=3, high=VOCAB) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- hashing
def test_table_rows_match_plain_python_hashing():
    block = make_engram(layer_id=2)
    ids = torch.tensor([[5, 5, 5, 5, 1, 2, 5, 5], [0, 39, 0, 39, 0, 39, 0, 39]])  # repeated n-grams: same rows
    got = block.table_indices(BlockContext.for_tokens(ids))
    assert got.tolist() == reference_rows(block, ids.tolist())
    assert torch.equal(got[0, 2], got[0, 3]) and torch.equal(got[1, 3], got[1, 5])
    primes = block.primes.tolist()
    assert all(is_prime(p) for p in primes) and len(set(primes)) == len(primes) == 4
    assert primes[:2] >= [7, 7] and primes[2:] >= [13, 13]
    assert block.row_offsets.tolist() == [0, primes[0], sum(primes[:2]), sum(primes[:3])]
    assert block.pool.num_rows == sum(primes)
    assert int(got.max()) < block.pool.num_rows and int(got.min()) >= 0


def test_primes_and_multipliers():
    import sympy

    for n in [0, 1, 2, 3, 4, 25, 97, 7919, 2**31 - 1, 2**61 - 1, 10**12 + 39, 10**12 + 37, 3215031751]:
        assert is_prime(n) == sympy.isprime(n), n
    assert table_primes([10, 10], 3) == [[11, 13, 17], [19, 23, 29]]  # distinct across orders
    m1, m2 = hash_multipliers(3, 100, 0, 1), hash_multipliers(3, 100, 0, 2)
    assert torch.all(m1 % 2 == 1) and not torch.equal(m1, m2)
    assert torch.equal(m1, hash_multipliers(3, 100, 0, 1))  # deterministic
    assert int(m1.max()) * 101 < 2**63  # id · multiplier fits int64 (pad id = vocab_size included)


# ---------------------------------------------------------------------------------------------- forward + grads
@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("kw", [{}, {"max_ngram": 4, "table_rows": 5, "dilation": 1, "kernel_size": 4}])
def test_forward_and_gradients_match_reference(update, kw):
    block = make_engram(update=update, **kw)
    ids = token_ids()
    ids[0, 4:8] = ids[0, 0:4]  # duplicate n-grams: the same rows read twice, their gradients add
    x = torch.randn(2, 9, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn_like(x)
    params = list(block.parameters())
    xb, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = block(xb, BlockContext.for_tokens(ids))
    y_ref = reference_engram(block, xr, ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(y, [xb, *params], grad_out)
    want = torch.autograd.grad(y_ref, [xr, *params], grad_out)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    for name, g, w in zip(names, got, want, strict=True):
        if name == "private_pool.values":
            assert g.is_sparse == (update == "sparse")
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"gradient of {name} differs")


def test_sparse_table_gradient_holds_only_the_rows_read():
    block = make_engram(update="sparse")
    ids = token_ids((1, 4))
    block(torch.randn(1, 4, DIM, dtype=torch.float64), BlockContext.for_tokens(ids)).sum().backward()
    touched = set(block.pool.values.grad.coalesce().indices()[0].tolist())
    assert touched == set(block.table_indices(BlockContext.for_tokens(ids)).flatten().tolist())


# ---------------------------------------------------------------------------------------------- KV cache
def tiny_model(**engram) -> Transformer:
    torch.manual_seed(0)
    add = {"block": "engram", "layer_id": 1, **SMALL, **engram}
    model = Transformer(vocab_size=VOCAB, dim=DIM * 2, n_layers=2, n_heads=2, max_seq_len=32, block="dense",
                        block_args={"hidden": 16},
                        layers={1: {"block": "beside", "base": {"block": "dense", "hidden": 16}, "add": add,
                                    "init": "none"}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 1, 5], [2, 1, 1, 8]])
def test_kv_cache_decode_equals_full_recompute_across_window_boundaries(chunks):
    """Prompts of length 1 and chunks of 1..8 tokens: every n-gram window (up to 3 tokens) and the convolution's
    reach ((3-1)·3 = 6 inputs) crosses cache boundaries."""
    model = tiny_model()
    ids = token_ids((2, sum(chunks)), seed=5)
    with torch.no_grad():
        full = model(ids)
        caches, steps, start = model.new_caches(2, ids.shape[1]), [], 0
        for n in chunks:
            steps.append(model(ids[:, start : start + n], caches))
            start += n
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert set(caches[1].block_state) == {"engram.ids", "engram.conv"}
    assert caches[1].block_state["engram.ids"].tolist() == ids[:, -2:].tolist()  # identity lookup: the last 2 ids
    prompt = ids[:, :1]
    assert torch.equal(model.generate(prompt, 8, use_cache=True), model.generate(prompt, 8, use_cache=False))


# ---------------------------------------------------------------------------------------------- table controls
def test_single_row_table_carries_no_token_information():
    block = make_engram(table="single_row")
    assert block.pool.num_rows == 4  # one row per (order, head)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    a = block(x, BlockContext.for_tokens(token_ids(seed=1)))
    b = block(x, BlockContext.for_tokens(token_ids(seed=2)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    learned = make_engram()
    assert not torch.allclose(learned(x, BlockContext.for_tokens(token_ids(seed=1))),
                              learned(x, BlockContext.for_tokens(token_ids(seed=2))))
    assert (block.active_parameters(), block.flops_per_token()) == (learned.active_parameters(),
                                                                    learned.flops_per_token())


def test_frozen_random_table_reads_its_rows_and_never_trains_them():
    model = tiny_model(table="frozen_random")
    table = model.layers[1].ffn.add.pool.values
    assert not table.requires_grad
    before = table.clone()
    lm = memzoo.LanguageModel(architecture=model.config.to_dict())
    lm.model.load_state_dict(model.state_dict())
    optimizer = lm.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert all(p is not lm.model.layers[1].ffn.add.pool.values for g in optimizer.param_groups for p in g["params"])
    ids = token_ids((2, 8))
    lm.model(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    assert torch.equal(lm.model.layers[1].ffn.add.pool.values, before)
    x = torch.randn(1, 8, DIM * 2)
    block = model.layers[1].ffn.add
    assert not torch.allclose(block(x, BlockContext.for_tokens(ids[:1])), block(x, BlockContext.for_tokens(ids[1:])))


# ---------------------------------------------------------------------------------------------- vocabulary
def authors_normalizer():
    """The authors' normalizer sequence, built with the ``tokenizers`` library (a test-only reference)."""
    from tokenizers import Regex, normalizers

    sentinel = "\ue000"
    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])


def test_normalizer_matches_the_tokenizers_library():
    """Every character of the Basic Multilingual Plane that Unicode 3.2 assigns (later characters can differ: the
    library's tables and Python's unicodedata are of other Unicode versions), and some strings."""
    import unicodedata

    reference = authors_normalizer()
    texts = [chr(c) for c in range(0x10000) if unicodedata.ucd_3_2_0.category(chr(c)) not in ("Cn", "Cs")]
    texts += [" Apple", "APPLE ", "\tapple\n", "  ", " \n ", "Ｆｕｌｌ", "Ça", "ﬁne", "İstanbul", "\u00a0x\u3000",
              "a\u0301", " ", "\n", "\x1c", "é", "\ue000", " \ue000 x"]
    bad = [t for t in texts if normalize_token_text(t) != reference.normalize_str(t)]
    assert not bad, [(t, normalize_token_text(t), reference.normalize_str(t)) for t in bad[:5]]


def test_byte_tokenizer_compression():
    lookup, size = compressed_vocabulary(ByteTokenizer().id_texts())
    assert len(lookup) == 258
    assert lookup[ord("A")] == lookup[ord("a")] and lookup[ord("Z")] == lookup[ord("z")]
    assert lookup[ord(" ")] == lookup[ord("\t")] == lookup[ord("\n")] == lookup[ord("\r")]
    assert len({lookup[i] for i in range(128, 256)}) == 128  # lone UTF-8 bytes keep their own ids
    assert lookup[256] != lookup[257] and size == 258 - 26 - 3
    assert lookup == sorted(lookup) or lookup[0] == 0  # first-seen order


def test_hf_tokenizer_compression_matches_the_authors_rule(tmp_path):
    """A byte-level BPE vocabulary: ids merge exactly when the authors' key (tokenizers' normalizer on the text
    decoded alone, its raw token on U+FFFD, the text when it normalises to nothing) is equal."""
    from test_data_tokenizers import _train_tokenizer

    tok = HFTokenizer(_train_tokenizer(tmp_path / "tokenizer.json", specials=("<|endoftext|>", "<PAD>", "<pad>")))
    lookup, size = compressed_vocabulary(tok.id_texts())
    reference, keys = authors_normalizer(), {}
    rust = tok._tokenizer
    expected = []
    for i in range(tok.vocab_size):
        text = rust.decode([i], skip_special_tokens=False)
        key = rust.id_to_token(i) if "\ufffd" in text else (reference.normalize_str(text) or text)
        expected.append(keys.setdefault(key, len(keys)))
    assert lookup == expected and size == len(keys) < tok.vocab_size
    vocab = rust.get_vocab()
    assert lookup[vocab["<PAD>"]] == lookup[vocab["<pad>"]]


def test_bound_lookup_lives_in_the_state_dict_and_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memzoo.export.hf import export_model

    torch.manual_seed(0)
    model = Transformer(vocab_size=258, dim=16, n_layers=1, n_heads=2, max_seq_len=16,
                        layers={0: {"block": "beside", "base": {"block": "dense", "hidden": 16},
                                    "add": {"block": "engram", **SMALL}, "init": "none"}}).eval()
    engram = model.layers[0].ffn.add
    before = model(torch.tensor([[65, 66, 10]]))
    model.bind_tokenizer(ByteTokenizer())
    assert engram.lookup[65] == engram.lookup[97] and int(engram.pad_id) == int(engram.lookup[257])
    ids = torch.tensor([[65, 66, 10], [97, 98, 32]])  # "AB\n" and "ab ": the same compressed ids
    with torch.no_grad():
        logits = model(ids)
    assert not torch.allclose(logits[:1], before)
    fresh = Transformer(model.config)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.layers[0].ffn.add.lookup, engram.lookup)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "hf", tokenizer="byte"),
                                                           trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_build_model_binds_the_data_tokenizer():
    config = {"model": {"class_path": "memzoo.LanguageModel", "init_args": {"architecture": {
        "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
        "layers": {0: {"block": "beside", "base": {"block": "dense", "hidden": 16},
                       "add": {"block": "engram", **SMALL}, "init": "none"}}}}},
        "data": {"class_path": "memzoo.data.FactsDataModule", "init_args": {"n_entities": 5, "block_size": 16}}}
    engram = memzoo.build_model(config).model.layers[0].ffn.add
    assert engram.lookup[65] == engram.lookup[97] and int(engram.pad_id) == int(engram.lookup[257])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, message", [
    ({"ngram_dim": 7}, r"ngram_dim=7 must be a multiple of heads=2"),
    ({"max_ngram": 1}, r"max_ngram must be an int >= 2"),
    ({"table": "random"}, r"unknown table 'random'; choose one of \['learned', 'single_row', 'frozen_random'\]"),
    ({"table_rows": [7]}, r"table_rows has 1 entries but max_ngram gives 2 orders"),
    ({"table_rows": 0}, r"table_rows must be a positive int, got 0"),
    ({"layer_id": -1}, r"layer_id must be an int >= 0, got -1"),
])
def test_bad_hyperparameters_name_the_value(kw, message):
    with pytest.raises(BlockConfigError, match=message):
        create_block("engram", dim=DIM, vocab_size=VOCAB, **{**SMALL, **kw})


def test_bad_calls_name_the_fix():
    block = make_engram()
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"indexed by token ids: call it as block\(x, BlockContext.for_tokens"):
        block(x)
    with pytest.raises(ValueError, match=r"token_ids \(1, 4\) must match x's \(B, T\) \(1, 3\)"):
        block(x, BlockContext.for_tokens(torch.zeros(1, 4, dtype=torch.int64)))
    with pytest.raises(TypeError, match="has no id_texts"):
        block.bind_tokenizer(object())
    with pytest.raises(ValueError, match="the tokenizer has 258 ids but the model's vocab_size is 40"):
        block.bind_tokenizer(ByteTokenizer())


def test_beside_zero_init_starts_at_the_base():
    torch.manual_seed(0)
    block = create_block("beside", dim=DIM, base={"block": "dense", "hidden": 16},
                         add={"block": "engram", "vocab_size": VOCAB, **SMALL}, init="zero")
    block.init_weights(0.02, 0.01)
    x, ctx = torch.randn(2, 5, DIM), BlockContext.for_tokens(token_ids((2, 5)))
    torch.testing.assert_close(block(x, ctx), block.base(x, ctx), rtol=0, atol=0)


def test_training_setup_binds_the_data_tokenizer(tmp_path):
    """``LanguageModel.setup`` hands the data module's tokenizer to the blocks before the first step."""
    import lightning as L

    from memzoo.data import FactsDataModule

    arch = {"vocab_size": 258, "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
            "layers": {0: {"block": "beside", "base": {"block": "dense", "hidden": 16},
                           "add": {"block": "engram", **SMALL}, "init": "none"}}}
    lm = memzoo.LanguageModel(architecture=arch, warmup_steps=1)
    engram = lm.model.layers[0].ffn.add
    assert torch.equal(engram.lookup, torch.arange(258))  # identity before a tokenizer is bound
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lm, FactsDataModule(n_entities=5, block_size=16, batch_size=2))
    assert engram.lookup[65] == engram.lookup[97] and int(engram.pad_id) == int(engram.lookup[257])


def test_beside_hands_the_model_vocab_size_to_a_token_indexed_child_only():
    block = create_block("beside", dim=DIM, vocab_size=VOCAB, base={"block": "dense", "hidden": 16},
                         add={"block": "engram", **SMALL})
    assert block.add.vocab_size == VOCAB and block.add.hparams["vocab_size"] == VOCAB
    with pytest.raises(BlockConfigError, match="block 'dense' is not indexed by token ids; drop its vocab_size"):
        create_block("beside", dim=DIM, base={"block": "dense", "vocab_size": 5}, add="dense")
    with pytest.raises(BlockConfigError, match="'engram' is indexed by token ids and needs the model's vocab_size"):
        create_block("beside", dim=DIM, base="dense", add={"block": "engram", **SMALL})
