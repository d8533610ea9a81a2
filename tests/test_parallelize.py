"""``memzoo.parallel.parallelize``: activation checkpointing, then compile, then sharding, applied once, from
``LanguageModel.configure_model`` (which no longer asks the strategy for a ``parallelize`` method).

Sharding itself (a ``(data_parallel, memory_parallel)`` mesh) is tested with 2 gloo processes in
``tests/test_memory_parallel.py``, which trains through ``configure_model`` and so through this function."""

from __future__ import annotations

import inspect

import pytest
import torch

from memzoo.model.transformer import Transformer
from memzoo.parallel import parallelize
from memzoo.parallel.memory_parallel import MemoryParallelError
from memzoo.parallel.parallelize import APPLIED

MODEL = dict(
    vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=16,
    layers={1: {"block": "memory_plus", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 8}},
    pools={"memory": {"n_keys": 8, "value_dim": 16}},
)


def _loss_and_grads(model: Transformer, tokens: torch.Tensor):
    model.zero_grad()
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_with_equal_results():
    torch.manual_seed(0)
    plain = Transformer(**MODEL)
    checkpointed = Transformer(**MODEL)
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(checkpointed, activation_checkpointing=True)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    handle = checkpointed.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = _loss_and_grads(checkpointed, tokens)
    handle.remove()
    assert len(calls) == 2  # forward, and again in backward: the layer's activations were recomputed
    ref_loss, ref_grads = _loss_and_grads(plain, tokens)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_order_is_checkpointing_then_compile_and_applied_once():
    model = Transformer(**MODEL)
    parallelize(model, compile="aot_eager", activation_checkpointing=True)
    layer = model.layers[0]
    assert layer._compiled_call_impl is not None  # compiled in place ...
    assert "checkpoint" in getattr(layer.forward, "func", lambda: None).__name__  # ... around the checkpointed forward
    assert getattr(model, APPLIED) == {"activation_checkpointing": True, "compile": "aot_eager", "mesh": None}
    forward = layer.forward
    parallelize(model, compile="aot_eager", activation_checkpointing=True)  # a second stage: nothing more
    assert layer.forward is forward
    out = model(torch.randint(0, 64, (1, 8)))
    assert out.shape == (1, 8, 64)


def test_a_foreign_mesh_and_bad_compile_are_refused():
    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

    with pytest.raises(MemoryParallelError, match=r"axes \('data_parallel', 'tensor_parallel'\).*MemoryParallelStrategy"):
        parallelize(Transformer(**MODEL), Mesh())
    with pytest.raises(TypeError, match="compile must be true, false or a torch.compile backend name, got 3"):
        parallelize(Transformer(**MODEL), compile=3)


def test_configure_model_calls_parallelize_and_no_strategy_method():
    from memzoo.training.module import LanguageModel

    source = inspect.getsource(LanguageModel.configure_model)
    assert "parallelize(self.model" in source and "trainer.strategy" not in source and "getattr" not in source
    module = LanguageModel(MODEL, activation_checkpointing=True)
    module.configure_model()  # no trainer: no mesh
    assert getattr(module.model, APPLIED)["activation_checkpointing"] is True


@pytest.mark.slow
def test_compile_keeps_a_sparse_pool_read_in_one_graph_per_layer():
    """A pool with sparse updates returns a row-sparse gradient whose row count is data-dependent; compiled layers
    trace it (dynamic output shapes captured) instead of breaking the graph, and match eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = {**MODEL, "pools": {"memory": {**MODEL["pools"]["memory"], "update": "sparse"}}}
    torch.manual_seed(0)
    plain = Transformer(**config)
    compiled = Transformer(**config)
    compiled.load_state_dict(plain.state_dict())
    parallelize(compiled, compile="aot_eager")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(compiled, tokens)
    assert dict(counters["unimplemented"]) == {} and counters["aot_autograd"]["not_ok"] == 0
    ref_loss, ref_grads = _loss_and_grads(plain, tokens)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    values = "pools.memory.values"
    assert grads[values].is_sparse and ref_grads[values].is_sparse
    for name, grad in ref_grads.items():
        got = grads[name].to_dense() if grads[name].is_sparse else grads[name]
        torch.testing.assert_close(got, grad.to_dense() if grad.is_sparse else grad, msg=name)
