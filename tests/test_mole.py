"""MoLE (``lookup_experts`` / preset ``mole``) against a float64 reference written from the paper's equations,
its re-parameterisation into lookup tables (equal outputs for every token id), and the model-level path: config,
state dict, KV cache and the Hugging Face export in both modes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from memzoo.blocks.base import BlockContext
from memzoo.blocks.mole import LookupExperts
from memzoo.blocks.registry import BlockConfigError, create_block
from memzoo.model.config import ModelConfig
from memzoo.model.reparameterize import reparameterize_lookup_experts
from memzoo.model.transformer import Transformer

VOCAB, DIM = 13, 6


def gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def reference(h, ids, emb, router, w1, w2, norm_w, up, down, eps):
    """Plain loops: ``y_t = W_2 gelu(W_1 h_t) + Σ_j softmax(W_r h_t)_j · D_j gelu(U_j RMSNorm(embed(v_t)))``."""
    B, T, _ = h.shape
    out = torch.zeros_like(h)
    for b in range(B):
        for t in range(T):
            logits = router @ h[b, t]
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            e = emb[int(ids[b, t])]
            u = e / torch.sqrt((e * e).mean() + eps) * norm_w
            y = w2 @ gelu(w1 @ h[b, t])
            for j in range(router.shape[0]):
                y = y + p[j] * (down[j] @ gelu(up[j] @ u))
            out[b, t] = y
    return out


def block64(n_experts=3, seed=0) -> tuple[LookupExperts, nn.Embedding]:
    torch.manual_seed(seed)
    embedding = nn.Embedding(VOCAB, DIM).double()
    block = create_block("mole", dim=DIM, vocab_size=VOCAB, n_experts=n_experts, hidden=5, expert_hidden=4,
                         embedding=embedding).double()
    with torch.no_grad():  # every parameter away from its init, so each term matters
        for param in block.parameters():
            param.normal_(0, 0.7)
    return block, embedding


def test_experts_mode_forward_and_gradients_match_the_reference():
    block, embedding = block64()
    ids = torch.tensor([[3, 3, 0, 12], [7, 3, 12, 1]])  # repeated ids, both ends of the vocabulary
    h = torch.randn(2, 4, DIM, dtype=torch.float64, requires_grad=True)
    out = block(h, BlockContext.for_tokens(ids))
    named = {"embed": embedding.weight, "router": block.router.weight, "w1": block.up.weight,
             "w2": block.down.weight, "norm": block.expert_norm.weight, "up": block.experts.up,
             "down": block.experts.down}
    copies = {k: v.detach().clone().requires_grad_() for k, v in named.items()}
    h_ref = h.detach().clone().requires_grad_()
    expected = reference(h_ref, ids, copies["embed"], copies["router"], copies["w1"], copies["w2"], copies["norm"],
                         copies["up"], copies["down"], block.norm_eps)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-11, atol=1e-11)
    for name, param in named.items():
        torch.testing.assert_close(param.grad, copies[name].grad, rtol=1e-11, atol=1e-11, msg=name)
    # the experts' gradient reaches the model's embedding, for the ids that occur only
    assert embedding.weight.grad[[0, 1, 3, 7, 12]].abs().min(dim=1).values.gt(0).all()
    assert embedding.weight.grad[[2, 4, 5, 6, 8, 9, 10, 11]].abs().max() == 0


def test_lookup_mode_equals_experts_mode_for_every_token_id():
    block, _ = block64(n_experts=4)
    ids = torch.cat([torch.arange(VOCAB), torch.arange(VOCAB).flip(0)]).view(2, VOCAB)  # every id, twice
    h = torch.randn(2, VOCAB, DIM, dtype=torch.float64)
    ctx = BlockContext.for_tokens(ids)
    h_experts = h.clone().requires_grad_()
    before = block(h_experts, ctx)
    before.square().sum().backward()
    router_grad = block.router.weight.grad.clone()
    block.zero_grad()
    table = block.lookup_table(chunk=5)  # chunks that do not divide the vocabulary
    block.reparameterize(chunk=5)
    assert block.mode == "lookup" and block.hparams["mode"] == "lookup"
    assert block.experts is None and block.expert_norm is None
    torch.testing.assert_close(block.pool.values, table, rtol=0, atol=0)
    assert block.pool.num_rows == VOCAB * 4 and block.pool.values.dtype == torch.float64
    h_lookup = h.clone().requires_grad_()
    after = block(h_lookup, ctx)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    after.square().sum().backward()
    torch.testing.assert_close(h_lookup.grad, h_experts.grad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(block.router.weight.grad, router_grad, rtol=1e-11, atol=1e-11)
    # table row v·n + j is expert j of token v
    assert torch.equal(block.table_indices(BlockContext.for_tokens(torch.tensor([[2]]))), torch.tensor([[[8, 9, 10, 11]]]))
    with pytest.raises(ValueError, match="already in lookup mode"):
        block.reparameterize()


def test_accounting_in_both_modes():
    block = create_block("mole", dim=64, vocab_size=100)
    assert block.hparams == {"block": "mole", "vocab_size": 100, "n_experts": 4, "hidden": 256, "expert_hidden": 256,
                             "mode": "experts", "norm_eps": 1e-6}
    shared = 2 * 64 * 4 + 4 * 64 * 256 + 2 * 4 * 64
    assert block.flops_per_token() == shared + 4 * 4 * 64 * 256
    assert block.table_bytes_read_per_token() == 0
    block.attach_embedding(nn.Embedding(100, 64))
    block.reparameterize()
    assert block.flops_per_token() == shared
    assert block.table_bytes_read_per_token() == 4 * 64 * 4
    assert block.active_parameters() == 64 * 4 + 2 * 64 * 256 + 4 * 64
    assert sum(p.numel() for p in block.parameters()) == 64 * 4 + 2 * 64 * 256 + 100 * 4 * 64


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=258, dim=16, n_layers=3, n_heads=2, max_seq_len=24, block="dense",
                         block_args={"hidden": 16},
                         layers={1: {"block": "mole", "n_experts": 2, "hidden": 16, "expert_hidden": 8},
                                 -1: {"block": "mole", "n_experts": 3, "hidden": 8}})
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_model_reparameterization_keeps_logits_config_and_cache_decoding():
    model = tiny_model().double()
    keys = set(model.state_dict())
    assert "embed.weight" in keys and not any("embed" in k for k in keys if k.startswith("layers."))
    ids = torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    assert reparameterize_lookup_experts(model) == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-12, atol=1e-12)
    assert model.config.layers[1]["mode"] == model.config.layers[2]["mode"] == "lookup"
    assert model.config.layers[2] == {"block": "mole", "n_experts": 3, "hidden": 8, "mode": "lookup"}
    # the new config rebuilds exactly the new tensors
    rebuilt = Transformer(ModelConfig.from_dict(model.config.to_dict())).double()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), before, rtol=1e-12, atol=1e-12)
    # KV-cache decoding in lookup mode equals recomputation
    prompt = ids[:, :4]
    assert torch.equal(model.generate(prompt, 5, use_cache=True), model.generate(prompt, 5, use_cache=False))
    with pytest.raises(ValueError, match=r"already in lookup mode; export without --reparameterize"):
        reparameterize_lookup_experts(model)
    with pytest.raises(ValueError, match="has no MoLE"):
        reparameterize_lookup_experts(Transformer(vocab_size=258, dim=16, n_layers=1, n_heads=2))


def test_export_in_both_modes_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memzoo.cli import main
    from memzoo.export.hf import export_model

    model = tiny_model()
    ckpt = tmp_path / "mole.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"architecture": model.config.to_dict()}}, ckpt)
    ids = torch.randint(0, 258, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
    experts_dir = export_model(model, tmp_path / "experts", tokenizer="byte")
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lookup"), "--tokenizer", "byte",
          "--reparameterize"])
    for folder, mode in ((experts_dir, "experts"), (tmp_path / "lookup", "lookup")):
        config = json.loads((folder / "config.json").read_text())
        assert [b.get("mode") for b in config["blocks"]] == [None, mode, mode]
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # experts' weights are gone from the lookup export, the tables are there
    from safetensors import safe_open

    with safe_open(tmp_path / "lookup" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "layers.1.ffn.private_pool.values" in names and not any(".experts." in n for n in names)
    from memzoo.cli import CommandError

    with pytest.raises(CommandError, match="--reparameterize: nothing to re-parameterise"):
        dense = tmp_path / "dense.ckpt"
        plain = Transformer(vocab_size=258, dim=16, n_layers=1, n_heads=2)
        torch.save({"state_dict": {f"model.{k}": v for k, v in plain.state_dict().items()},
                    "hyper_parameters": {"architecture": plain.config.to_dict()}}, dense)
        main(["export", "--ckpt", str(dense), "--out", str(tmp_path / "no"), "--tokenizer", "byte",
              "--reparameterize"])


def test_bad_inputs_name_the_value_and_the_fix():
    block = create_block("mole", dim=8, vocab_size=10, hidden=8)
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match=r"none is attached.*attach_embedding\(model.embed\)"):
        block(x, BlockContext.for_tokens(torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="the embedding has 11 rows but vocab_size is 10"):
        block.attach_embedding(nn.Embedding(11, 8))
    with pytest.raises(ValueError, match="nn.Embedding of width 8"):
        block.attach_embedding(nn.Embedding(10, 4))
    block.attach_embedding(nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="reads the token ids"):
        block(x)
    with pytest.raises(ValueError, match=r"token_ids \(1, 2\) do not match"):
        block(x, BlockContext.for_tokens(torch.zeros(1, 2, dtype=torch.long)))
    with pytest.raises(BlockConfigError, match="unknown mode 'table'"):
        create_block("mole", dim=8, vocab_size=10, mode="table")
    with pytest.raises(BlockConfigError, match="n_experts must be a positive int, got 0"):
        create_block("mole", dim=8, vocab_size=10, n_experts=0)
    with pytest.raises(TypeError, match="does not read the model's embedding"):
        create_block("dense", dim=8).attach_embedding(nn.Embedding(10, 8))
