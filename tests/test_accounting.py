"""Parameter and FLOP accounting against hand arithmetic on small models (the arithmetic is in the comments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn as nn

from memzoo.accounting import attention_flops_per_token, block_flops_per_token, summarize
from memzoo.blocks.base import Block
from memzoo.config_accounting import summarize_config
from memzoo.model.summary import count_parameters
from memzoo.model.transformer import Transformer


class NoFlopsBlock(Block):
    """A block that does not count its own FLOPs: the base class estimates 2 × active parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, ctx=None):
        return self.proj(x)


def dense_moe_model() -> Transformer:
    return Transformer(
        vocab_size=10, dim=8, n_layers=2, n_heads=2, max_seq_len=32,
        block="dense", block_args={"hidden": 16},
        layers={1: {"block": "moe", "n_experts": 4, "top_k": 2, "hidden": 16}},
    )


def test_dense_and_moe_by_hand():
    summary = summarize(dense_moe_model(), context_length=6)
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["embed", "layers.0.attn", "layers.0.ffn", "layers.1.attn", "layers.1.ffn", "head"]
    # embedding 10·8; a token reads one row of 8
    assert (rows["embed"].parameters, rows["embed"].active_parameters, rows["embed"].flops) == (80, 8, 0)
    # attention: qkv 8·24 = 192, proj 8·8 = 64, two RMSNorm weights 2·8 = 16 → 272
    # FLOPs at T = 6: 2·8·24 = 384, 2·8·8 = 128, scores + values 2·8·(6+1) = 112 → 624
    for i in (0, 1):
        attn = rows[f"layers.{i}.attn"]
        assert (attn.parameters, attn.active_parameters, attn.flops) == (272, 272, 624)
    # dense SwiGLU, hidden 16: 3·8·16 = 384 parameters, 2·384 = 768 FLOPs
    dense = rows["layers.0.ffn"]
    assert (dense.kind, dense.parameters, dense.active_parameters, dense.flops) == ("dense", 384, 384, 768)
    # MoE: router 8·4 = 32 + 4 experts · 384 = 1568; active 32 + 2·384 = 800; FLOPs 2·8·4 + 2·768 = 1600
    moe = rows["layers.1.ffn"]
    assert (moe.kind, moe.parameters, moe.active_parameters, moe.flops) == ("moe", 1568, 800, 1600)
    # tied head: stores only the final norm (8); reads the norm and the 10·8 matrix; 2·8·10 = 160 FLOPs
    head = rows["head"]
    assert (head.kind, head.parameters, head.active_parameters, head.flops) == ("head (tied)", 8, 88, 160)
    # totals: 80 + 2·272 + 384 + 1568 + 8 = 2584; 8 + 2·272 + 384 + 800 + 88 = 1824; 2·624 + 768 + 1600 + 160
    assert summary.parameters == 2584 == count_parameters(dense_moe_model())
    assert summary.active_parameters == 1824
    assert summary.flops == 3776
    assert summary.context_length == 6 and not summary.notes
    # table bytes: the MoE's 2 routed experts, 384 float32 weights each (2·384·4 = 3072); dense reads no table
    assert (dense.table_bytes, moe.table_bytes, summary.table_bytes) == (0, 3072, 3072)


def test_shared_peer_pool_untied_head_by_hand():
    peer = {"pool": "experts", "heads": 2, "knn": 3, "k_dim": 4, "query_norm": "none"}
    model = Transformer(
        vocab_size=10, dim=8, n_layers=2, n_heads=2, max_seq_len=16, tie_embeddings=False,
        block="peer", block_args=peer, pools={"experts": {"kind": "experts", "n_keys": 4, "value_dim": 8}},
    )
    summary = summarize(model)  # context length defaults to max_seq_len = 16
    rows = {r.name: r for r in summary.rows}
    # attention FLOPs at T = 16: 384 + 128 + 2·8·17 = 784
    assert rows["layers.0.attn"].flops == 784 and summary.context_length == 16
    # PEER: query 8·(2·4) = 64, one shared key set 2·4·2 = 16 → 80 stored in the block
    # active: 80 + 2 heads · 3 experts · (8 down + 8 up) = 176
    # FLOPs: query 2·8·8 = 128, half scores 2·2·4·4 = 64, candidate sums 2 heads · 5 pairs (3+1+1) = 10,
    # experts 4·2·3·8 = 192 → 394
    for i in (0, 1):
        row = rows[f"layers.{i}.ffn"]
        assert (row.kind, row.parameters, row.active_parameters, row.flops) == ("peer (pool experts)", 80, 176, 394)
    # the pool: 16 experts · (8 + 8) = 256 stored once, no active parameters of its own
    pool = rows["pools.experts"]
    assert (pool.kind, pool.parameters, pool.active_parameters, pool.flops) == ("pool (experts, dense)", 256, 0, 0)
    # table bytes: 2 heads · 3 experts · (8 down + 8 up) float32 = 384 per layer
    assert rows["layers.0.ffn"].table_bytes == 384 and summary.table_bytes == 768
    # untied head: 10·8 matrix + final norm 8 = 88
    assert (rows["head"].kind, rows["head"].parameters, rows["head"].active_parameters) == ("head", 88, 88)
    # totals: 80 (embed) + 2·272 + 2·80 + 256 + 88 = 1128; FLOPs 2·784 + 2·394 + 160 = 2516
    assert summary.parameters == 1128 == count_parameters(model)
    assert summary.active_parameters == 8 + 2 * 272 + 2 * 176 + 88
    assert summary.flops == 2516


def test_block_without_flops_method_is_estimated_and_marked():
    assert block_flops_per_token(NoFlopsBlock(4)) == (32, True)
    model = Transformer(vocab_size=10, dim=8, n_layers=1, n_heads=2, block=f"{__name__}.NoFlopsBlock")
    summary = summarize(model, context_length=4)
    ffn = summary.rows[2]
    assert (ffn.parameters, ffn.flops, ffn.flops_estimated) == (64, 128, True)
    assert "estimated as 2 × active parameters" in summary.table()
    assert "128*" in summary.table()


def test_attention_flops_formula():
    # dim 4, T = 1: projections 2·4·12 + 2·4·4 = 128, one key attended: 2·2·4 = 16
    assert attention_flops_per_token(4, 1) == 144
    # each extra position of context adds 2·dim FLOPs on average (half a key, 4·dim per key)
    assert attention_flops_per_token(4, 11) - attention_flops_per_token(4, 1) == 10 * 2 * 4


def test_table_and_dict():
    summary = summarize(dense_moe_model(), context_length=6)
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["total"] == {"parameters": 2584, "active_parameters": 1824, "flops": 3776, "table_bytes": 3072}
    assert data["context_length"] == 6
    assert [r["name"] for r in data["rows"]][:3] == ["embed", "layers.0.attn", "layers.0.ffn"]
    table = summary.table()
    assert "2,584" in table and "1,824" in table and "3,776" in table
    assert "causal sequence of 6 tokens" in table
    total_line = [line for line in table.splitlines() if line.startswith("total")]
    assert len(total_line) == 1 and total_line[0].split()[1:] == ["2,584", "1,824", "3,776", "3,072"]
    assert "table bytes/token" in table.splitlines()[0]


def test_accepts_a_module_holding_the_transformer():
    holder = nn.Module()
    holder.model = dense_moe_model()
    assert summarize(holder, context_length=6).flops == 3776


def test_bad_arguments():
    with pytest.raises(TypeError, match="needs a memzoo Transformer"):
        summarize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="context_length must be a positive int, got 0"):
        summarize(dense_moe_model(), context_length=0)


# ---------------------------------------------------------------------------------------------- from a config
ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = """
model:
  class_path: memzoo.LanguageModel
  init_args:
    architecture:
      dim: 8
      n_layers: 2
      n_heads: 2
      max_seq_len: 32
      block_args: {hidden: 16}
      layers:
        1: {block: moe, n_experts: 4, top_k: 2, hidden: 16}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.01}
data:
  class_path: memzoo.data.TextDataModule
  init_args: {path: /nonexistent/corpus.txt, block_size: 6}
"""


def test_summarize_config_builds_the_model_without_the_data(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    summary = summarize_config(str(path))
    # vocab_size linked from the data's (default byte) tokenizer: 258 ids; context = the data's block_size
    reference = Transformer(vocab_size=258, dim=8, n_layers=2, n_heads=2, max_seq_len=32, block_args={"hidden": 16},
                            layers={1: {"block": "moe", "n_experts": 4, "top_k": 2, "hidden": 16}})
    assert summary.rows == summarize(reference, context_length=6).rows
    # 258·8 embedding + the hand-computed body of test_dense_and_moe_by_hand (2584 - 80)
    assert summary.parameters == 258 * 8 + 2584 - 80
    assert summarize_config(str(path), context_length=30).context_length == 30


def test_summarize_config_applies_command_line_overrides_as_fit_would(tmp_path):
    """``overrides`` are parsed after the config as by ``memzoo fit``: one key inside ``layers`` merges into the
    configured entry, for a config with a data section and for a model-only one (its stand-in data section)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    plain = summarize_config(str(path))
    wider = summarize_config(str(path), overrides=["--model.init_args.architecture.layers.1.hidden", "32"])
    reference = Transformer(vocab_size=258, dim=8, n_layers=2, n_heads=2, max_seq_len=32, block_args={"hidden": 16},
                            layers={1: {"block": "moe", "n_experts": 4, "top_k": 2, "hidden": 32}})
    assert wider.rows == summarize(reference, context_length=6).rows and wider.flops > plain.flops
    model_only = tmp_path / "model-only.yaml"
    model_only.write_text(TINY_CONFIG.split("data:")[0])
    assert summarize_config(str(model_only), context_length=6, vocab_size=258, overrides=[
        "--model.init_args.architecture.layers.1.hidden", "32"]).rows == wider.rows


def test_summarize_config_rejects_bad_model_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_CONFIG.replace("n_heads: 2", "n_hedas: 2"))
    with pytest.raises(ValueError, match="n_hedas"):
        summarize_config(str(path))
    path.write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(ValueError, match="needs a `model:` section"):
        summarize_config(str(path))


@pytest.mark.parametrize("name, block", [("facts-peer", "peer"), ("facts-moe", "moe"), ("text-peer", "peer")])
def test_shipped_configs_summarize(name, block):
    summary = summarize_config(str(ROOT / "configs" / f"{name}.yaml"))
    kinds = [r.kind.split()[0] for r in summary.rows]
    assert block in kinds and summary.active_parameters < summary.parameters


def test_summary_verb_prints_table_and_json(tmp_path, capsys):
    from memzoo.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    main(["summary", "--config", str(path)])
    table = capsys.readouterr().out
    assert "layers.1.ffn" in table and "moe" in table and "causal sequence of 6 tokens" in table
    main(["summary", "--config", str(path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["parameters"] == 258 * 8 + 2584 - 80
