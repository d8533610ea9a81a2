"""The block contract: token ids and absolute positions reach blocks (also with a KV cache), declared defaults,
and init / reset_parameters of the built-in blocks."""

import pytest
import torch
import torch.nn as nn

from memzoo.blocks import registry
from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.moe import MoE
from memzoo.blocks.peer import PEER
from memzoo.model.transformer import Transformer


class TokenPositionTable(Block):
    """A token-indexed block: ``y = E[token] + P[position]``, ignoring the hidden states' values."""

    seen: list[torch.Tensor]

    def __init__(self, dim: int, vocab: int = 32, max_len: int = 16):
        super().__init__()
        self.by_token = nn.Embedding(vocab, dim)
        self.by_position = nn.Embedding(max_len, dim)
        self.seen = []

    def forward(self, x, ctx=None):
        self.seen.append(ctx.positions.clone())
        return self.by_token(ctx.token_ids) + self.by_position(ctx.positions)


@pytest.fixture
def token_block(clean_registry):
    registry.register_block("token_position_table")(TokenPositionTable)


def test_token_indexed_block_sees_ids_and_absolute_positions_with_a_kv_cache(token_block):
    torch.manual_seed(0)
    model = Transformer(vocab_size=32, dim=8, n_layers=2, n_heads=2, max_seq_len=16, block="token_position_table",
                        block_args={"vocab": 32, "max_len": 16}).eval()
    prompt = torch.randint(0, 32, (2, 4))
    cached = model.generate(prompt, max_new_tokens=5, use_cache=True)
    block = model.layers[0].ffn
    # prefix 0..3, then one absolute position per step: 4, 5, 6, 7 (the last token is not fed back)
    assert [p[0].tolist() for p in block.seen] == [[0, 1, 2, 3], [4], [5], [6], [7]]
    assert all(p.shape[0] == 2 for p in block.seen)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, use_cache=False))
    with torch.no_grad():
        full = model(cached)
    block.seen.clear()
    caches = model.new_caches(2, cached.shape[1])
    with torch.no_grad():
        steps = [model(cached[:, :4], caches)] + [model(cached[:, i : i + 1], caches) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_block_context_for_tokens():
    ctx = BlockContext.for_tokens(torch.zeros(3, 2, dtype=torch.long), start=5)
    assert ctx.positions.tolist() == [[5, 6]] * 3 and ctx.token_ids.shape == (3, 2)


def test_dense_and_moe_reset_parameters_follow_the_model_init():
    torch.manual_seed(0)
    dense = DenseMLP(64, hidden=256)
    dense.reset_parameters(std=0.1, residual_std=0.0)
    assert abs(dense.gate.weight.std().item() - 0.1) < 0.01 and not dense.down.weight.any()
    moe = MoE(16, n_experts=3, top_k=1, hidden=32)
    moe.reset_parameters(std=0.05, residual_std=0.0)
    assert all(not expert.down.weight.any() for expert in moe.experts)
    assert abs(moe.router.weight.std().item() - 0.05) < 0.02


def test_peer_reset_parameters_and_init_weights_treat_a_private_pool_alike():
    peer = PEER(16, n_keys=4, heads=2, knn=2, k_dim=8)
    torch.manual_seed(1)
    peer.reset_parameters(0.05, 0.0)
    reset = {name: p.clone() for name, p in peer.named_parameters()}
    torch.manual_seed(1)
    peer.init_weights(0.05, 0.0)
    for name, p in peer.named_parameters():
        assert torch.equal(p, reset[name]), name
    assert not peer.pool.up.any() and abs(peer.pool.down.std().item() - 0.05) < 0.02
