"""The MoE baseline against a loop-over-tokens reference, and its auxiliary losses on hand-made router outputs."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from memzoo.blocks.moe import MoE, load_balancing_loss, router_z_loss
from memzoo.model.transformer import Transformer
from memzoo.registry import BlockConfigError, create_block

DIM = 12


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: softmax router, sort the probabilities, run the chosen SwiGLU experts by hand."""
    rows = []
    for token in x.reshape(-1, DIM):
        probs = F.softmax(moe.router.weight @ token, dim=0)
        order = sorted(range(moe.n_experts), key=lambda e: -probs[e].item())[: moe.top_k]
        chosen = torch.stack([probs[e] for e in order])
        if moe.renormalize:
            chosen = chosen / chosen.sum()
        y = torch.zeros_like(token)
        for weight, e in zip(chosen, order, strict=True):
            expert = moe.experts[e]
            hidden = F.silu(expert.gate.weight @ token) * (expert.up.weight @ token)
            y = y + weight * (expert.down.weight @ hidden)
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def make_moe(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    args = dict(n_experts=5, top_k=2, hidden=8)
    args.update(kw)
    moe = MoE(DIM, **args).double()
    moe.init_weights(std=0.5, residual_std=0.5)  # a router with spread-out probabilities
    return moe


def random_input(seed: int = 1, shape=(3, 7, DIM)) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 2, 5])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_loop_over_tokens_reference(top_k, renormalize):
    moe = make_moe(top_k=top_k, renormalize=renormalize)
    x = random_input()
    x_block, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad_out = random_input(seed=9)
    params = list(moe.parameters())
    y = moe(x_block)
    got = torch.autograd.grad(y, [x_block, *params], grad_out, allow_unused=True)
    y_ref = reference_moe(moe, x_ref)
    want = torch.autograd.grad(y_ref, [x_ref, *params], grad_out, allow_unused=True)
    torch.testing.assert_close(y, y_ref)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:  # an expert no token chose gets no gradient in either
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, msg=f"gradient of {name} differs")


def test_every_expert_used_when_top_k_is_all_of_them():
    moe = make_moe(top_k=5)
    moe(random_input()).sum().backward()
    assert all(e.gate.weight.grad is not None for e in moe.experts)


def test_unchosen_experts_get_no_gradient():
    moe = make_moe(n_experts=6, top_k=1)
    x = random_input(shape=(1, 1, DIM))
    experts, _, _ = moe.route(x.reshape(-1, DIM))
    moe(x).sum().backward()
    chosen = experts.item()
    for e, expert in enumerate(moe.experts):
        assert (expert.gate.weight.grad is not None) == (e == chosen)


def test_route_weights_are_top_probabilities():
    moe = make_moe(top_k=3, renormalize=False)
    tokens = random_input().reshape(-1, DIM)
    experts, weights, logits = moe.route(tokens)
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights, probs.gather(-1, experts))
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # most probable first
    torch.testing.assert_close(weights, probs.topk(3, dim=-1).values)


# ---------------------------------------------------------------------------------------------- auxiliary losses
def test_load_balancing_loss_by_hand_top1():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    experts = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4); P = ((.9+.6+.3+.8)/4, (.1+.4+.7+.2)/4) = (.65, .35); 2·(.75·.65 + .25·.35) = 1.15
    torch.testing.assert_close(load_balancing_loss(probs.log(), experts, 2), torch.tensor(1.15))


def test_load_balancing_loss_by_hand_top2():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    experts = torch.tensor([[0, 1], [1, 2]])
    # f = (1, 2, 1)/4; P = (.3, .45, .25); 3·(.25·.3 + .5·.45 + .25·.25) = 3·.3625 = 1.0875
    torch.testing.assert_close(load_balancing_loss(probs.log(), experts, 3), torch.tensor(1.0875))


def test_load_balancing_loss_is_one_when_uniform_and_grads_only_through_probabilities():
    logits = torch.zeros(4, 4, requires_grad=True)
    experts = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    loss = load_balancing_loss(logits, experts, 4)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    (grad,) = torch.autograd.grad(loss, logits)
    # f is uniform (1/4 each), so the loss is 4 · Σ_e ¼ · P_e = Σ_e P_e = 1 for any logits: zero gradient
    torch.testing.assert_close(grad, torch.zeros(4, 4))


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 = 2 ln 2; mean of squares = (1 + 4)/2 · ln²2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2.0) ** 2))


def test_aux_losses_after_training_forward_only():
    moe = make_moe(aux_loss_weight=0.01, z_loss_weight=0.001)
    x = random_input()
    moe(x)
    aux = moe.aux_losses()
    tokens = x.reshape(-1, DIM)
    experts, _, logits = moe.route(tokens)
    torch.testing.assert_close(aux["load_balance"], 0.01 * load_balancing_loss(logits, experts, 5))
    torch.testing.assert_close(aux["z_loss"], 0.001 * router_z_loss(logits))
    aux["load_balance"].backward()
    assert moe.router.weight.grad.abs().sum() > 0
    moe.eval()
    moe(x)
    assert moe.aux_losses() == {}
    moe.train()
    assert make_moe(aux_loss_weight=0.0)(x) is not None
    unweighted = make_moe(aux_loss_weight=0.0)
    unweighted(x)
    assert unweighted.aux_losses() == {}


def test_transformer_collects_moe_aux_losses():
    torch.manual_seed(0)
    model = Transformer(vocab_size=11, dim=16, n_layers=2, n_heads=2,
                        layers={1: {"block": "moe", "n_experts": 3, "top_k": 2, "hidden": 8}})
    model(torch.randint(0, 11, (2, 5)))
    assert set(model.aux_losses()) == {"layers.1.load_balance"}


# ---------------------------------------------------------------------------------------------- accounting
def test_active_parameters_and_flops_by_hand():
    moe = MoE(dim=16, n_experts=4, top_k=2, hidden=8)
    # router 16·4 = 64; an expert holds gate, up, down: 3·16·8 = 384; two of them active
    assert moe.active_parameters() == 64 + 2 * 384
    assert sum(p.numel() for p in moe.parameters()) == 64 + 4 * 384
    # router 2·16·4 = 128; per expert 2·3·16·8 = 768
    assert moe.flops_per_token() == 128 + 2 * 768


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 6}, "top_k=6 exceeds n_experts=5"),
        ({"n_experts": 0}, "n_experts must be a positive int, got 0"),
        ({"top_k": 0}, "top_k must be a positive int, got 0"),
        ({"hidden": 0}, "hidden must be a positive int or null"),
        ({"aux_loss_weight": -0.1}, "aux_loss_weight must be >= 0, got -0.1"),
        ({"z_loss_weight": -1.0}, "z_loss_weight must be >= 0, got -1.0"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    args = dict(n_experts=5, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        MoE(DIM, **args)


def test_registry_builds_moe_and_wraps_errors():
    assert isinstance(create_block("moe", dim=DIM, n_experts=2, top_k=1), MoE)
    with pytest.raises(BlockConfigError, match="top_k=3 exceeds n_experts=2"):
        create_block("moe", dim=DIM, n_experts=2, top_k=3)
