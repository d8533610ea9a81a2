"""LanguageModel.training_step: one batch, or a list of batches whose loss is the sum of each part's mean
cross-entropy plus each part's auxiliary losses (against a plain reference computed from the Transformer)."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.training.module import LanguageModel

ARCH = {"vocab_size": 32, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "block_args": {"hidden": 32},
        "layers": {1: {"block": "moe", "n_experts": 4, "top_k": 2, "hidden": 16, "aux_loss_weight": 0.5}}}


def batch(b, t, seed, masked=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (b, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :masked] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def reference(model, parts):
    """Sum over parts of (mean CE over labelled tokens + that forward's auxiliary losses)."""
    total = 0.0
    for part in parts:
        logits = model(part["input_ids"])
        total = total + F.cross_entropy(logits.flatten(0, 1), part["labels"].flatten(), ignore_index=-100)
        total = total + sum(model.aux_losses().values())
    return total


def test_a_list_of_batches_sums_each_parts_loss_and_gradients():
    torch.manual_seed(0)
    module = LanguageModel(ARCH)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    parts = [batch(3, 12, 0), batch(5, 4, 1, masked=2)]  # different shapes: not one tensor
    loss = module.training_step(parts, 0)
    grads = torch.autograd.grad(loss, list(module.model.parameters()), allow_unused=True)
    expected = reference(module.model, parts)
    expected_grads = torch.autograd.grad(expected, list(module.model.parameters()), allow_unused=True)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, rtol=1e-5, atol=1e-7))
    single = module.training_step(parts[0], 0)  # one batch: as before, that batch's loss
    assert torch.allclose(single, reference(module.model, parts[:1]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(single, loss)
    with pytest.raises(ValueError, match="empty list of batches"):
        module.training_step([], 0)
