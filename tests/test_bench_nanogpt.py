"""tools/bench_nanogpt.py without nanoGPT: the study config's size, the shared windows, a run against a stand-in."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "study" / "shakespeare-nanogpt.yaml"

# a stand-in with nanoGPT's interface (GPTConfig, GPT(config) -> (logits, loss), configure_optimizers), written here
STAND_IN = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 10
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 8
    dropout: float = 0.0
    bias: bool = False

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(config.vocab_size, d), wpe=nn.Embedding(config.block_size, d))
        )
        self.body = nn.Linear(d, d, bias=False)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        logits = self.lm_head(torch.relu(self.body(self.transformer.wte(idx) + self.transformer.wpe(pos))))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        extra = dict(fused=True) if device_type == "cuda" else dict()  # nanoGPT's choice of its fused path
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay, **extra)
'''


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_nanogpt", ROOT / "tools" / "bench_nanogpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_non_embedding_params(n_layer: int, n_embd: int) -> int:
    """nanoGPT with bias=False, without token and position embeddings: per layer c_attn 3d², c_proj d², c_fc 4d²,
    mlp c_proj 4d², two LayerNorm weights 2d; plus ln_f d."""
    return n_layer * (12 * n_embd**2 + 2 * n_embd) + n_embd


def test_study_config_matches_nanogpts_non_embedding_parameter_count_within_two_percent():
    bench = load_bench()
    model, _ = bench.build_memzoo(CONFIG, 258)
    counts = bench.parameter_counts(model, [model.embed.weight, model.head.weight])
    target = nanogpt_non_embedding_params(bench.RECIPE["n_layer"], bench.RECIPE["n_embd"])
    assert target == 787_584
    assert abs(counts["non_embedding"] / target - 1) <= 0.02, counts
    assert counts["total"] == counts["non_embedding"] + 258 * 128  # tied embeddings counted once


def test_memzoo_takes_the_configs_adamw_implementation_and_refuses_other_recipes(tmp_path):
    bench = load_bench()
    _, opt = bench.build_memzoo(CONFIG, 65)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True  # the shipped config's fused: true
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (1e-3, (0.9, 0.99), 0.1)
    arch = "architecture: {dim: 16, n_layers: 1, n_heads: 2, block: dense, max_seq_len: 64}"

    def config(optimizer: str) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(f"model:\n  init_args:\n    {arch}\n    optimizer: {optimizer}\n")
        return path

    plain = "{class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3, betas: [0.9, 0.99], weight_decay: 0.1}}"
    assert bench.memzoo_adamw_options(config(plain)) == {}
    assert bench.build_memzoo(config(plain), 65)[1].defaults["fused"] is True  # unset: memzoo's fused default
    loop = plain.replace("weight_decay: 0.1", "weight_decay: 0.1, fused: false")
    assert bench.memzoo_adamw_options(config(loop)) == {"fused": False}
    assert bench.build_memzoo(config(loop), 65)[1].defaults["fused"] is False  # asked for: PyTorch's loop
    with pytest.raises(SystemExit, match="optimizer lr 0.01 is not the recipe's 0.001"):
        bench.memzoo_adamw_options(config(plain.replace("1.0e-3", "1.0e-2")))
    with pytest.raises(SystemExit, match=r"settings \['eps'\] are not the recipe's"):
        bench.memzoo_adamw_options(config(plain.replace("weight_decay: 0.1", "weight_decay: 0.1, eps: 1.0e-6")))
    with pytest.raises(SystemExit, match="torch.optim.SGD"):
        bench.memzoo_adamw_options(config("{class_path: torch.optim.SGD, init_args: {lr: 1.0e-3}}"))


def test_windows_give_both_models_the_same_characters():
    bench = load_bench()
    chars, bytes_, vocab = bench.windows(None, n=6, block=9, seed=0)
    assert chars.shape == bytes_.shape == (6, 10) and vocab == 65
    assert chars.max() < vocab
    # one character ↔ one byte: equal bytes map to equal ids and the order of symbols is kept
    assert torch.equal(torch.argsort(bytes_.flatten(), stable=True), torch.argsort(chars.flatten(), stable=True))


@pytest.mark.parametrize("vocab, memzoo_vocab, fused", [("recipe", 65, False), ("bytes", 258, True)])
def test_run_against_a_stand_in_reports_ratios_and_counts(tmp_path, capsys, vocab, memzoo_vocab, fused):
    (tmp_path / "model.py").write_text(STAND_IN)
    config = tmp_path / "tiny.yaml"
    arch = "{dim: 16, n_layers: 1, n_heads: 2, block: dense, max_seq_len: 64}"
    config.write_text(f"model:\n  init_args:\n    architecture: {arch}\n")
    out = tmp_path / "bench.json"
    result = load_bench().main(
        ["--nanogpt", str(tmp_path), "--config", str(config), "--text", str(tmp_path / "none.txt"), "--steps", "2",
         "--warmup", "1", "--repeats", "2", "--vocab", vocab, "--json", str(out)]
        + (["--nanogpt-fused-adamw"] if fused else [])
    )
    assert result["vocab"] == {"nanogpt": 65, "memzoo": memzoo_vocab} and result["compiled"] is False
    assert result["adamw_fused"] == {"nanogpt": fused, "memzoo": True}  # memzoo without an optimizer: fused
    assert result["params"]["memzoo"]["total"] - result["params"]["memzoo"]["non_embedding"] == memzoo_vocab * 16
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["ratios_memzoo_vs_nanogpt"]) == 2 and result["median_ratio_memzoo_vs_nanogpt"] > 0
    assert result["median_cpu_time_ratio_memzoo_vs_nanogpt"] > 0
    assert result["params"]["memzoo"]["non_embedding"] < result["params"]["memzoo"]["total"]
    assert "ratio memzoo/nanoGPT" in capsys.readouterr().out
    (target,) = result["targets"]
    assert target["met"] is result["target_met"] is (result["median_ratio_memzoo_vs_nanogpt"] >= 1.0)
    assert target["target"].startswith("memzoo's dense decoder >= 1.0x nanoGPT's tokens/s")
    assert ("both with fused AdamW" in target["target"]) is fused


@pytest.mark.parametrize("ratios, met", [([0.97, 1.01, 1.04], True), ([0.93, 0.99, 1.02], False)])
def test_targets_read_the_median_wall_time_ratio_over_pairs(ratios, met):
    result = {"ratios_memzoo_vs_nanogpt": ratios, "median_ratio_memzoo_vs_nanogpt": sorted(ratios)[1],
              "median_cpu_time_ratio_memzoo_vs_nanogpt": 1.2, "compiled": True, "torch_threads": 1,
              "adamw_fused": {"nanogpt": False, "memzoo": True}}
    (target,) = load_bench().targets(result)
    assert target["met"] is met
    assert target["target"].endswith("(1 thread(s), compiled, each AdamW as configured)")
    assert target["detail"] == (f"{sorted(ratios)[1]:.3f}x by wall time (median of 3 pairs, {min(ratios):.2f}–"
                                f"{max(ratios):.2f}); 1.200x by CPU time")


def test_compile_needs_a_warmup_to_compile_in(tmp_path):
    with pytest.raises(SystemExit, match="--warmup 2 or more"):
        load_bench().main(["--nanogpt", str(tmp_path), "--compile", "--warmup", "1"])


def test_a_missing_checkout_names_the_clone_command(tmp_path):
    with pytest.raises(SystemExit, match="git clone https://github.com/karpathy/nanoGPT"):
        load_bench().main(["--nanogpt", str(tmp_path)])
