"""LoRA through peft on memzoo's decoder: starts unchanged, trains only the adapters, merges back to plain linears
with the same logits; bad targets fail clearly; LanguageModel's `lora:` option."""

import pytest
import torch

pytest.importorskip("peft")

from memzoo.model.transformer import Transformer  # noqa: E402
from memzoo.training.lora import LoraConfigError, apply_lora, linear_names, merge_lora  # noqa: E402
from memzoo.training.module import LanguageModel  # noqa: E402
from memzoo.training.optim import build_optimizer  # noqa: E402

ARGS = dict(vocab_size=30, dim=16, n_layers=2, n_heads=2, max_seq_len=16, block_args={"hidden": 32},
            layers={1: {"block": "memory_plus", "pool": "mem", "heads": 2, "knn": 2, "gate": "silu"}},  # has out_proj
            pools={"mem": {"n_keys": 4, "value_dim": 16}})


def test_lora_trains_only_adapters_and_merges_back_to_the_same_logits():
    torch.manual_seed(0)
    model = Transformer(**ARGS)
    names = linear_names(model)
    ids = torch.randint(0, 30, (2, 8))
    base_logits = model(ids)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = apply_lora(model, r=2, alpha=4, target_modules=["qkv", "ffn.down", "out_proj"])
    assert adapted == ["layers.0.attn.qkv", "layers.0.ffn.down", "layers.1.attn.qkv", "layers.1.ffn.out_proj"]
    assert torch.equal(model(ids), base_logits)  # B = 0: starts at the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
    tuned = model(ids).detach()
    assert not torch.allclose(tuned, base_logits)
    for key, value in model.state_dict().items():  # base weights untouched
        if "lora_" not in key:
            assert torch.equal(value, frozen[key.replace(".base_layer", "")]), key
    assert merge_lora(model) == 4
    assert linear_names(model) == names and all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
    torch.testing.assert_close(model(ids), tuned, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == sorted(frozen)


def test_lora_defaults_target_every_decoder_linear_and_bad_targets_fail():
    model = Transformer(**ARGS)
    assert len(apply_lora(Transformer(**ARGS))) == len(linear_names(model))
    with pytest.raises(LoraConfigError, match="'wq' matches no linear layer"):
        apply_lora(model, target_modules=["wq"])
    with pytest.raises(LoraConfigError, match="r must be a positive int"):
        apply_lora(model, r=0)


def test_language_model_lora_option_gives_the_optimizer_only_adapters():
    lm = LanguageModel(architecture=ARGS, lora={"r": 2, "target_modules": ["qkv"]}, unfreeze=["pools.*.values"])
    optimizer = build_optimizer(lm.model, lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = [n for n, p in lm.model.named_parameters() if id(p) in held]
    assert sorted(n for n in names if ".lora_" not in n) == ["pools.mem.values"]
    assert sum(".lora_" in n for n in names) == 4  # A and B of both layers' qkv
    assert lm.hparams.lora == {"r": 2, "target_modules": ["qkv"]}


def test_a_lora_checkpoint_exports_with_merged_adapters(tmp_path):
    from memzoo.export.hf import export_checkpoint
    from memzoo.pretrained import load_pretrained

    torch.manual_seed(0)
    lm = LanguageModel(architecture={**ARGS, "vocab_size": 258}, lora={"r": 2, "target_modules": ["qkv", "down"]})
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # trained adapters: no longer zero
    ids = torch.randint(0, 258, (2, 8))
    expected = lm.eval()(ids)
    ckpt = tmp_path / "lora.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "export", tokenizer="byte")
    torch.testing.assert_close(load_pretrained(out)(ids), expected, rtol=1e-5, atol=1e-5)
