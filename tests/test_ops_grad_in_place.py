"""Dense table gradients added in place into an existing ``.grad`` (see :mod:`memzoo.ops.sparse_gather`): the
same sums as the plain reference, no ``(N, D)`` transient once ``.grad`` exists, and the dense form wherever the
row form would be visible to the caller (``autograd.grad``, ``create_graph``, non-leaf tables, excluded inputs)."""

import contextlib

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memzoo.model.transformer import Transformer
from memzoo.ops import gather_dot, sparse_gather, weighted_gather
from mp_workers import start_ranks
from test_ops_sparse_gather import (
    OPS,
    make_inputs,
    peak_cpu_bytes,
    reference_gather_dot,
    reference_weighted_gather,
)


def record_layouts(tensor: torch.Tensor) -> list:
    """The layout of every gradient autograd hands to ``tensor`` (what AccumulateGrad receives for a leaf)."""
    seen = []
    tensor.register_hook(lambda grad: seen.append(grad.layout))
    return seen


def micro_batches(op_name, n_rows=40, dim=6, count=3):
    """``count`` (indices, third, upstream) triples with duplicate indices, reading one table of ``n_rows``."""
    batches = []
    for seed in range(count):
        _, indices, third = make_inputs(op_name, n_rows, dim, (5,), 4, seed=seed + 1)
        upstream = torch.randn(5, dim if op_name == "weighted_gather" else 4, dtype=torch.float64)
        batches.append((indices, third.detach(), upstream))
    return batches


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("op_name", OPS)
def test_gradient_accumulation_matches_reference_and_adds_rows_once_grad_exists(op_name, device):
    """On CUDA: the Triton row-sparse gradient, added into the dense ``.grad`` by CUDA's dense += sparse."""
    op, reference = OPS[op_name]
    dtype = torch.float64 if device == "cpu" else torch.float32  # fp32 on the GPU, as models train there
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=dtype, device=device))
    ref_values = torch.nn.Parameter(values.detach().clone())
    layouts = record_layouts(values)
    for indices, third, upstream in micro_batches(op_name):
        indices, third, upstream = indices.to(device), third.to(device, dtype), upstream.to(device, dtype)
        (op(values, indices, third) * upstream).sum().backward()
        (reference(ref_values, indices, third) * upstream).sum().backward()
    # the first backward creates .grad (dense, kept as is); the later ones add their rows into it
    assert layouts == [torch.strided, torch.sparse_coo, torch.sparse_coo]
    assert values.grad.layout == torch.strided
    torch.testing.assert_close(values.grad, ref_values.grad)


def test_grads_zeroed_in_place_take_the_row_form():
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    optimizer = torch.optim.SGD([values], lr=0.1)
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    first = values.grad.clone()
    optimizer.zero_grad(set_to_none=False)
    layouts = record_layouts(values)
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    assert layouts == [torch.sparse_coo] and values.grad.layout == torch.strided
    torch.testing.assert_close(values.grad, first)


def test_two_reads_of_one_table_in_one_graph_add_up_in_place():
    """Two layers sharing a pool, during gradient accumulation."""
    values = torch.nn.Parameter(torch.randn(16, 4, dtype=torch.float64))
    ref_values = torch.nn.Parameter(values.detach().clone())
    weights, x = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    idx_a, idx_b = torch.randint(0, 16, (3, 5)), torch.randint(0, 8, (3, 5))
    for _ in range(2):
        ((weighted_gather(values, idx_a, weights) ** 2).sum() + (gather_dot(values, idx_b, x) ** 3).sum()).backward()
        ((reference_weighted_gather(ref_values, idx_a, weights) ** 2).sum()
         + (reference_gather_dot(ref_values, idx_b, x) ** 3).sum()).backward()
    assert values.grad.layout == torch.strided
    torch.testing.assert_close(values.grad, ref_values.grad)


def test_autograd_grad_receives_a_dense_gradient_and_leaves_grad_alone():
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    before = values.grad.clone()
    (grad,) = torch.autograd.grad((weighted_gather(values, indices, weights) * upstream).sum(), [values])
    assert grad.layout == torch.strided
    torch.testing.assert_close(grad, before)
    assert torch.equal(values.grad, before)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # the cycle is this test's own
def test_create_graph_keeps_the_dense_form_and_double_backward_works():
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    weights.requires_grad_()
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    layouts = record_layouts(values)
    (weighted_gather(values, indices, weights) ** 2).sum().backward(create_graph=True)
    assert layouts == [torch.strided]
    values.grad.sum().backward()  # second order through the accumulated dense .grad
    assert weights.grad is not None and torch.isfinite(weights.grad).all()


def test_non_leaf_table_keeps_the_dense_form():
    leaf = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    for _ in range(2):
        table = leaf * 2.0  # e.g. a cast under autocast: autograd, not AccumulateGrad, consumes its gradient
        layouts = record_layouts(table)
        (weighted_gather(table, indices, weights) * upstream).sum().backward()
        assert layouts == [torch.strided]
    assert leaf.grad.layout == torch.strided


def test_backward_with_inputs_excluding_the_table_leaves_its_grad_alone():
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    weights.requires_grad_()
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    before = values.grad.clone()
    (weighted_gather(values, indices, weights) * upstream).sum().backward(inputs=[weights])
    assert torch.equal(values.grad, before)


def test_without_pytorchs_engine_query_the_dense_form_is_used(monkeypatch):
    """The engine query is private PyTorch API: if a release drops it, gradients stay correct (dense)."""
    monkeypatch.setattr(sparse_gather, "_will_engine_execute_node", None)
    values = torch.nn.Parameter(torch.randn(40, 6, dtype=torch.float64))
    indices, weights, upstream = micro_batches("weighted_gather", count=1)[0]
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    layouts = record_layouts(values)
    (weighted_gather(values, indices, weights) * upstream).sum().backward()
    assert layouts == [torch.strided] and values.grad.layout == torch.strided


@pytest.mark.parametrize("op_name", OPS)
def test_no_table_sized_transient_once_grad_exists(op_name):
    """With ``.grad`` allocated, the backward's peak is the rows used, not a fresh ``(N, D)`` gradient."""
    op, _ = OPS[op_name]
    n_rows, dim = 65536, 64  # a 16 MiB table; the batch touches at most 512 rows (128 KiB)
    values, indices, third = make_inputs(op_name, n_rows, dim, (128,), 4, dtype=torch.float32)
    table_bytes = n_rows * dim * 4

    def step():
        op(values, indices, third).sum().backward()

    first = peak_cpu_bytes(step)  # .grad is None: the dense gradient becomes .grad
    assert first >= table_bytes
    later = peak_cpu_bytes(step)
    assert later < table_bytes / 16
    assert values.grad.layout == torch.strided


# ----------------------------------------------------------------------------------------------- DDP


def _initial_table() -> torch.Tensor:
    return torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _micro_batches(rank: int) -> list:
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randint(0, 32, (6, 3), generator=gen), torch.randn(6, 3, generator=gen, dtype=torch.float64))
            for _ in range(3)]


class _Table(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.values = torch.nn.Parameter(_initial_table())

    def forward(self, indices, weights):
        return weighted_gather(self.values, indices, weights)


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_Table())
        batches = _micro_batches(rank)
        for i, (indices, weights) in enumerate(batches):  # gradient accumulation: all-reduce on the last one
            with model.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
                (model(indices, weights) ** 2).sum().backward()
        results[rank] = model.module.values.grad.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_gradient_accumulation_averages_the_in_place_sums(tmp_path):
    """DDP's all-reduce hook runs after AccumulateGrad, on the dense ``.grad`` the later micro-batches' rows were
    added to: every rank ends with the average over ranks of its summed micro-batch gradients."""
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        start_ranks(_ddp_worker, world, world, str(tmp_path / "rendezvous"), results)
        grads = dict(results)
    reference = torch.nn.Parameter(_initial_table())
    for rank in range(world):
        for indices, weights in _micro_batches(rank):
            ((reference_weighted_gather(reference, indices, weights) ** 2).sum() / world).backward()
    for rank in range(world):
        torch.testing.assert_close(grads[rank], reference.grad)


# ----------------------------------------------------------------------------------------------- training


class _PeerLM(L.LightningModule):
    """Two PEER layers sharing one dense-update expert pool, trained with plain AdamW."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(
            vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=8, block="peer",
            block_args={"pool": "experts", "heads": 2, "knn": 3, "k_dim": 8, "query_norm": "layernorm"},
            pools={"experts": {"kind": "experts", "n_keys": 8, "value_dim": 16}},
        )

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self.model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit_with_accumulation(module: L.LightningModule, tmp_path) -> None:
    ids = torch.randint(0, 40, (8, 8), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)  # 4 micro-batches
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, gradient_clip_val=1.0)
    trainer.fit(module, loader)


def test_trainer_gradient_accumulation_trains_the_same_model_with_rows_added_in_place(tmp_path, monkeypatch):
    """Lightning with ``accumulate_grad_batches=2`` (``.grad`` set to ``None`` after each optimizer step): the second
    micro-batch of each step adds rows in place, and training ends where the all-dense path ends."""
    in_place = _PeerLM()
    layouts = record_layouts(in_place.model.pools["experts"].up)
    _fit_with_accumulation(in_place, tmp_path / "in_place")
    assert layouts == [torch.strided, torch.sparse_coo] * 2  # per step: create .grad, then add rows into it

    monkeypatch.setattr(sparse_gather, "_adds_into_dense_grad", lambda table: False)
    dense = _PeerLM()
    _fit_with_accumulation(dense, tmp_path / "dense")
    for (name, p), q in zip(in_place.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(in_place.model.pools["experts"].up, _PeerLM().model.pools["experts"].up)  # it trained
