"""Retrofitting: the `beside` composition block, init_from with retrofits (starts exactly at the base), freezing."""

import pytest
import torch

from memzoo.blocks.composition import Beside
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.pool import MemoryPool
from memzoo.build import build_language_model
from memzoo.model.retrofit import whiten_memory_queries
from memzoo.model.transformer import ModelConfigError, Transformer
from memzoo.training.freezing import FreezeConfigError, apply_freezing
from memzoo.training.init_from import InitFromError, load_initial_weights
from memzoo.training.module import LanguageModel
from memzoo.training.optim import build_optimizer

BASE = dict(vocab_size=40, dim=32, n_layers=3, n_heads=4, max_seq_len=32, block_args={"hidden": 48})
MEMORY = {"block": "memory_plus", "pool": "mem", "heads": 2, "knn": 4, "gate": "silu"}  # W_2 starts at zero
POOLS = {"mem": {"n_keys": 8, "value_dim": 16}}


def retrofitted(init="zero", **extra):
    layers = {1: {"block": "beside", "base": {"block": "dense", "hidden": 48}, "add": MEMORY, "init": init}}
    return Transformer(**BASE, layers=layers, **{"pools": POOLS, **extra})


def test_beside_sums_its_two_blocks_forward_and_grads():
    torch.manual_seed(0)
    block = Beside(16, base={"block": "dense", "hidden": 8}, add="dense", init="none").double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = block(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = block.base(x_ref) + block.add(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert isinstance(block.base, DenseMLP) and block.base.hidden == 8


@pytest.mark.parametrize("init", ["zero", "base_scale", "gate"])
def test_retrofit_starts_exactly_at_the_base_model(tmp_path, init):
    torch.manual_seed(0)
    base = Transformer(**BASE).eval()
    model = retrofitted(init).eval()
    load_initial_weights(model, base.state_dict())
    ids = torch.randint(0, 40, (2, 12))
    assert torch.equal(model(ids), base(ids))
    # the new branch trains: after one SGD step on all parameters the logits move
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
    assert model.layers[1].ffn.add.out_proj.weight.abs().sum() > 0 or model.layers[1].ffn.scale != 0


def test_base_scale_init_draws_the_branch_at_the_pretrained_ffn_scale_and_starts_at_the_base():
    torch.manual_seed(0)
    base = Transformer(**BASE).eval()
    with torch.no_grad():  # a pretrained FFN far from the model's init scale (0.02)
        base.layers[1].ffn.gate.weight.mul_(10)
        base.layers[1].ffn.up.weight.mul_(10)
        base.layers[1].ffn.down.weight.mul_(5)
    model = retrofitted("base_scale").eval()
    load_initial_weights(model, base.state_dict())
    ids = torch.randint(0, 40, (2, 12))
    assert torch.equal(model(ids), base(ids))  # zero output at step 0
    ffn = model.layers[1].ffn
    std, residual_std = ffn.base.weight_scales()
    pretrained = base.layers[1].ffn
    assert std == pytest.approx(float(torch.cat([pretrained.gate.weight, pretrained.up.weight]).detach().std()))
    assert residual_std == pytest.approx(float(pretrained.down.weight.detach().std())) and std > 0.15
    assert float(ffn.add.gate_proj.weight.detach().std()) == pytest.approx(std, rel=0.15)
    assert float(ffn.add.out_proj.weight.detach().std()) == pytest.approx(residual_std, rel=0.15)
    values = model.pools["mem"].values
    assert not values.any()
    model(ids).logsumexp(-1).mean().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0  # value rows learn from the first step
    # a source that already holds the branch (e.g. the healed model) is loaded as it is, not drawn again
    with torch.no_grad():
        values.normal_()
    healed = {k: v.clone() for k, v in model.state_dict().items()}
    again = retrofitted("base_scale")
    load_initial_weights(again, healed)
    assert all(torch.equal(v, healed[k]) for k, v in again.state_dict().items())


def test_whitened_memory_queries_spread_anisotropic_inputs_over_the_rows():
    torch.manual_seed(0)
    base = Transformer(**BASE).eval()
    with torch.no_grad():  # hidden states sharing one large direction, as a pretrained model's
        base.embed.weight.add_(3.0 * torch.randn(BASE["dim"]))
    model = retrofitted("base_scale", pools={"mem": {"n_keys": 16, "value_dim": 16}}).eval()
    load_initial_weights(model, base.state_dict())
    ids = torch.randint(0, 40, (8, 16))
    router = model.layers[1].ffn.add.router
    inputs = []
    hook = model.layers[1].ffn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, 32)))
    model(ids)
    hook.remove()

    def spread():  # distinct rows read, and the queries' largest second-moment eigenvalue over their mean
        with torch.no_grad():
            indices, _ = router(inputs[0])
            q = router.query(inputs[0]).double()
        eigenvalues = torch.linalg.eigvalsh(q.T @ q / len(q))
        return indices.unique().numel(), float(eigenvalues.max() / eigenvalues.mean())

    rows_before, ratio_before = spread()
    assert whiten_memory_queries(model, [ids]) == {1: 8 * 16}
    rows_after, ratio_after = spread()
    assert rows_after >= 4 * rows_before and ratio_after < ratio_before / 1.5  # measured: 8 -> 101 rows, 64 -> 31
    assert torch.equal(model(ids), base(ids))  # zero values: still the base model
    with pytest.raises(ValueError, match="no product-key memory"):
        whiten_memory_queries(base, [ids])


def test_base_scale_init_errors():
    with pytest.raises(ValueError, match="zero_output"):
        Beside(16, base="dense", add="dense", init="base_scale")
    with pytest.raises(ValueError, match="weight_scales"):
        Beside(16, base={"block": "product_key_memory", "n_keys": 4, "heads": 1, "knn": 2},
               add={"block": "product_key_memory", "n_keys": 4, "heads": 1, "knn": 2}, init="base_scale")
    # the source's trained values would be wiped: refused
    source = Transformer(**BASE, layers={2: dict(MEMORY)},
                         pools=POOLS)
    target = Transformer(**BASE, layers={1: {"block": "beside", "base": {"block": "dense", "hidden": 48},
                                             "add": MEMORY, "init": "base_scale"},
                                         2: dict(MEMORY)},
                         pools=POOLS)
    with pytest.raises(InitFromError, match="base_scale"):
        load_initial_weights(target, source.state_dict())


def test_zero_init_refuses_a_block_whose_output_does_not_zero():
    pool = MemoryPool(4, 16)
    with pytest.raises(ValueError, match="init: gate"):
        Beside(16, base="dense", add={"block": "product_key_memory", "pool": "p", "knn": 2, "heads": 1},
               pool=pool).init_weights(0.02, 0.0)


def test_beside_pool_errors_and_nested_pool_names():
    with pytest.raises(ValueError, match="no pool was handed in"):
        Beside(16, base="dense", add={"block": "product_key_memory", "pool": "mem"})
    with pytest.raises(ValueError, match="does not read memory pools"):
        Beside(16, base={"block": "dense", "pool": "mem"}, add="dense", pool=MemoryPool(4, 16))
    layers = {1: {"block": "beside", "base": {**MEMORY, "pool": "a"}, "add": {**MEMORY, "pool": "b"}}}
    with pytest.raises(ModelConfigError, match="different pools"):
        Transformer(**BASE, layers=layers, pools={"a": POOLS["mem"], "b": POOLS["mem"]})


def test_init_from_checkpoint_with_retrofit_and_freezing(tmp_path):
    torch.manual_seed(0)
    source = LanguageModel(architecture=BASE, warmup_steps=0)
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    layers = {1: {"block": "beside", "base": {"block": "dense", "hidden": 48}, "add": MEMORY}}
    lm = build_language_model(architecture={**BASE, "layers": layers, "pools": POOLS}, init_from=str(ckpt),
                       freeze=["*"], unfreeze=["pools.*.values"])
    ids = torch.randint(0, 40, (2, 10))
    assert torch.equal(lm.eval()(ids), source.eval()(ids))
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable == ["pools.mem.values"]
    optimizer = build_optimizer(lm.model, lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 1 and held[0] is lm.model.pools["mem"].values
    lm.model(ids).sum().backward()
    optimizer.step()
    assert list(optimizer.state) == [lm.model.pools["mem"].values]  # frozen parameters hold no optimizer state


def test_init_from_mismatches_fail_clearly(tmp_path):
    source = Transformer(**BASE)
    wider = Transformer(**{**BASE, "block_args": {"hidden": 64}})
    with pytest.raises(InitFromError, match="shapes differ"):
        load_initial_weights(wider, source.state_dict())
    fewer = Transformer(**{**BASE, "n_layers": 2})
    with pytest.raises(InitFromError, match="have no place"):
        load_initial_weights(fewer, source.state_dict())
    with pytest.raises(InitFromError, match="lacks"):
        load_initial_weights(source, fewer.state_dict())
    with pytest.raises(Exception, match="does not exist"):
        build_language_model(architecture=BASE, init_from=str(tmp_path / "missing.ckpt"))


def test_retrofit_naming_a_layer_out_of_range_fails():
    with pytest.raises(ModelConfigError, match="out of range"):
        Transformer(**BASE, layers={5: {"block": "beside", "base": "dense", "add": MEMORY}}, pools=POOLS)


def test_freezing_patterns_and_errors():
    model = retrofitted()
    names = apply_freezing(model, ["*"], ["layers.1.ffn.add.*"])
    assert names and all(n.startswith("layers.1.ffn.add.") for n in names)
    assert apply_freezing(model, ["embed.*"], []) and not model.embed.weight.requires_grad
    with pytest.raises(FreezeConfigError, match="'nope.*' matches no parameter"):
        apply_freezing(model, ["nope.*"], [])
    with pytest.raises(FreezeConfigError, match="leaves no parameter"):
        apply_freezing(model, ["*"], [])


def test_whiten_callback_whitens_a_fresh_retrofit_once(tmp_path):
    import lightning as L

    from memzoo.training.callbacks import WhitenMemoryQueries

    torch.manual_seed(0)
    source = LanguageModel(architecture=BASE, warmup_steps=0)
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    layers = {1: {"block": "beside", "base": {"block": "dense", "hidden": 48}, "add": MEMORY, "init": "base_scale"}}
    lm = build_language_model(architecture={**BASE, "layers": layers, "pools": POOLS}, init_from=str(ckpt),
                              freeze=["*"], unfreeze=["layers.*.ffn.add.*", "pools.*"], warmup_steps=0)
    ids = torch.randint(0, 40, (4, 9))
    data = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}] * 4
    query = lm.model.layers[1].ffn.add.router.query.weight
    before = query.detach().clone()

    def fit(callback):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                  callbacks=[callback]).fit(lm, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))

    fit(first := WhitenMemoryQueries(batches=2))
    assert first.whitened == {1: 2 * 4 * 8} and not torch.equal(query.detach(), before)
    fit(second := WhitenMemoryQueries(batches=2))
    assert second.whitened == {} and lm.model.pools["mem"].values.detach().any()  # trained values: left alone
    with pytest.raises(ValueError, match="positive int"):
        WhitenMemoryQueries(batches=0)


def _whiten_on_two_ranks(rank: int, world_size: int, ckpt: str) -> None:
    """A rank of the 2-process test below: each rank whitens on its own batches; rank 0's projection must win."""
    import lightning as L
    import torch.distributed as dist

    from memzoo.parallel import SparseDDPStrategy
    from memzoo.training.callbacks import WhitenMemoryQueries

    layers = {1: {"block": "beside", "base": {"block": "dense", "hidden": 48}, "add": MEMORY, "init": "base_scale"}}
    torch.manual_seed(0)
    lm = build_language_model(architecture={**BASE, "layers": layers, "pools": POOLS}, init_from=ckpt,
                              freeze=["*"], unfreeze=["layers.*.ffn.add.*", "pools.*"], warmup_steps=0)
    ids = torch.randint(0, 40, (8, 9), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]  # a distributed sampler splits them
    callback = WhitenMemoryQueries(batches=2)
    L.Trainer(accelerator="cpu", devices=world_size, strategy=SparseDDPStrategy(), max_steps=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              num_sanity_val_steps=0, callbacks=[callback]).fit(
        lm, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    assert callback.whitened == {1: 2 * 2 * 8}, callback.whitened
    query = lm.model.layers[1].ffn.add.router.query.weight.detach().contiguous()
    gathered = [torch.empty_like(query) for _ in range(world_size)]
    dist.all_gather(gathered, query)
    assert torch.equal(gathered[0], gathered[1]), "the ranks' query projections differ after whitening"


@pytest.mark.distributed
def test_whiten_callback_gives_every_rank_rank_zeros_projection(tmp_path):
    """2 gloo processes (forked), each whitening on its own share of the batches: without the broadcast their
    projections would differ (and stay different: DDP averages gradients, not weights)."""
    from mp_workers import launch

    torch.manual_seed(0)
    source = LanguageModel(architecture=BASE, warmup_steps=0)
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    launch(_whiten_on_two_ranks, 2, str(ckpt), lightning=True)
