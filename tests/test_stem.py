"""STEM (``token_embedding_ffn`` / preset ``stem``) against a float64 reference written from the paper's equation
``y_t = W_down(silu(W_gate x_t) ⊙ U[v_t])``: forward and gradients, repeated token ids, sparse updates, errors."""

from __future__ import annotations

import math

import pytest
import torch

from memzoo.blocks.base import BlockContext
from memzoo.blocks.registry import BlockConfigError, create_block
from memzoo.blocks.stem import TokenEmbeddingFFN


def reference(x, ids, w_gate, w_down, table):
    """Plain loops over positions: ``W_down (silu(W_gate x_t) ⊙ U[v_t])``."""
    B, T, _ = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            gate = w_gate @ x[b, t]
            out[b, t] = w_down @ (gate * torch.sigmoid(gate) * table[int(ids[b, t])])
    return out


def block64(vocab=11, dim=6, hidden=5, update="dense", seed=0):
    torch.manual_seed(seed)
    block = TokenEmbeddingFFN(dim, vocab_size=vocab, hidden=hidden, update=update).double()
    with torch.no_grad():
        block.pool.values.normal_()  # rows well away from the small init, so every term matters
    return block


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_forward_and_gradients_match_the_reference(update):
    block = block64(update=update)
    ids = torch.tensor([[3, 3, 0, 10], [7, 3, 10, 1]])  # repeated ids within and across rows, both table ends
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    out = block(x, BlockContext.for_tokens(ids))
    params = [p.detach().clone().requires_grad_() for p in (block.gate.weight, block.down.weight, block.pool.values)]
    x_ref = x.detach().clone().requires_grad_()
    expected = reference(x_ref, ids, *params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.gate.weight.grad, params[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.down.weight.grad, params[1].grad, rtol=1e-12, atol=1e-12)
    table_grad = block.pool.values.grad
    assert table_grad.is_sparse == (update == "sparse")
    table_grad = table_grad.to_dense()
    torch.testing.assert_close(table_grad, params[2].grad, rtol=1e-12, atol=1e-12)
    # only the rows of tokens that occur get a gradient; token 3 (three positions) collects all three
    untouched = sorted(set(range(11)) - {0, 1, 3, 7, 10})
    assert table_grad[untouched].abs().max() == 0 and table_grad[3].abs().max() > 0


def test_table_row_follows_the_token_not_the_hidden_state():
    """Two positions with equal hidden states but different tokens differ exactly through U[v]; equal tokens with
    equal hidden states give equal outputs."""
    block = block64()
    x = torch.randn(1, 1, 6, dtype=torch.float64).expand(1, 3, 6)
    out = block(x, BlockContext.for_tokens(torch.tensor([[4, 4, 9]])))
    torch.testing.assert_close(out[0, 0], out[0, 1], rtol=1e-14, atol=1e-14)
    assert not torch.allclose(out[0, 0], out[0, 2])
    assert torch.equal(block.table_indices(BlockContext.for_tokens(torch.tensor([[4, 9]]))), torch.tensor([[[4], [9]]]))


def test_preset_has_the_papers_settings_and_exact_accounting():
    block = create_block("stem", dim=64, vocab_size=1000)
    assert block.hparams == {"block": "stem", "vocab_size": 1000, "hidden": 192, "update": "dense", "lr": None,
                             "weight_decay": 0.1, "init_std": math.sqrt(2 / (1000 + 192))}
    assert block.pool.lr is None and block.pool.weight_decay == 0.1 and block.pool.num_rows == 1000
    assert block.active_parameters() == 2 * 64 * 192 + 192  # gate, down, one row
    assert block.flops_per_token() == 4 * 64 * 192 + 2 * 192
    assert block.table_bytes_read_per_token() == 192 * 4
    # the table's own init: Xavier-normal std
    assert abs(block.pool.values.std().item() - math.sqrt(2 / 1192)) < 0.002
    assert sum(p.numel() for p in block.parameters()) == 2 * 64 * 192 + 1000 * 192


def test_bad_inputs_name_the_value_and_the_fix():
    block = block64()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="reads the token ids.*BlockContext"):
        block(x)
    with pytest.raises(ValueError, match=r"token_ids \(2, 3\) do not match the hidden states \(2, 4, 6\)"):
        block(x, BlockContext.for_tokens(torch.zeros(2, 3, dtype=torch.long)))
    with pytest.raises(BlockConfigError, match="needs the model's vocab_size"):
        create_block("stem", dim=8)
    with pytest.raises(BlockConfigError, match="hidden must be a positive int, got 0"):
        create_block("stem", dim=8, vocab_size=10, hidden=0)
    with pytest.raises(BlockConfigError, match="unknown update 'lazy'"):
        create_block("stem", dim=8, vocab_size=10, update="lazy")
