"""``prefer_fused``: torch's fused Adam/AdamW step where a config leaves the implementation to torch, the same update,
and every setting that rules it out kept as given."""

import pytest
import torch

from memzoo.model.transformer import Transformer
from memzoo.training.optim import OptimizerBundle, build_optimizer, prefer_fused


def model(update: str = "dense", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    layer = dict(block="product_key_memory", heads=2, knn=3, k_dim=8, pool="shared")
    return Transformer(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=16, layers={1: layer},
                       pools={"shared": {"n_keys": 8, "value_dim": 16, "update": update, "lr_scale": 4.0}})


def adamw(**kw):
    return lambda groups: torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, **kw)


def train(net: Transformer, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = net(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def without_fused(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "fused")}


def test_an_unset_implementation_becomes_fused_with_every_group_setting_kept():
    fused = build_optimizer(model(), adamw())
    plain = build_optimizer(model(), adamw(fused=False))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    assert [g["fused"] for g in fused.param_groups] == [True] * len(fused.param_groups)
    assert [g["fused"] for g in plain.param_groups] == [False] * len(plain.param_groups)
    # lr, decay and the pool's lr_scale (applied once: 4 x its lr 1e-3) are those the factory's own optimizer had
    assert [without_fused(g) for g in fused.param_groups] == [without_fused(g) for g in plain.param_groups]
    assert sorted(g["lr"] for g in fused.param_groups) == pytest.approx([2e-3, 2e-3, 4e-3])
    assert [len(g["params"]) for g in fused.param_groups] == [len(g["params"]) for g in plain.param_groups]


def test_the_fused_step_trains_as_the_unfused_one():
    fused_net, plain_net = model(), model()
    fused, plain = build_optimizer(fused_net, adamw()), build_optimizer(plain_net, adamw(fused=False))
    train(fused_net, fused)
    train(plain_net, plain)
    moved = 0
    for (name, a), b in zip(fused_net.named_parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, model().get_parameter(name)))
    assert moved == len(list(fused_net.parameters()))  # every parameter took its updates


def test_the_dense_half_of_a_bundle_is_fused_the_row_wise_half_untouched():
    bundle = build_optimizer(model("sparse"), adamw())
    assert isinstance(bundle, OptimizerBundle)
    dense, rowwise = bundle.optimizers
    assert dense.defaults["fused"] is True and "fused" not in rowwise.defaults


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, fused=False),
    lambda p: torch.optim.AdamW(p, foreach=True),
    lambda p: torch.optim.AdamW(p, foreach=False),
    lambda p: torch.optim.Adam(p, capturable=True),
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: type("MyAdamW", (torch.optim.AdamW,), {})(p),
], ids=["fused-false", "foreach-true", "foreach-false", "capturable", "sgd", "subclass"])
def test_an_explicit_choice_or_another_optimizer_is_kept(make):
    optimizer = make([torch.nn.Parameter(torch.randn(3))])
    assert prefer_fused(optimizer) is optimizer


def test_parameters_the_fused_kernels_do_not_take_keep_the_optimizer():
    on_meta = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, device="meta"))])
    assert prefer_fused(on_meta) is on_meta
    stepped = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))])
    stepped.param_groups[0]["params"][0].grad = torch.ones(3)
    stepped.step()  # it has state: rebuilding would drop it
    assert prefer_fused(stepped) is stepped


def test_a_checkpoint_restores_the_implementation_it_was_trained_with():
    net = model()
    unfused = build_optimizer(net, adamw(fused=False))
    train(net, unfused, steps=1)
    resumed = build_optimizer(net, adamw())
    assert resumed.defaults["fused"] is True
    resumed.load_state_dict(unfused.state_dict())
    assert [g["fused"] for g in resumed.param_groups] == [False] * len(resumed.param_groups)
