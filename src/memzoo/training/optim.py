"""Optimizers for models with memory pools: parameter groups, row-wise sparse updates, one bundled optimizer.

A memory pool's value table can have millions of rows, of which a step reads a few thousand. With
``update: sparse`` the pool's gradient is a row-sparse COO tensor and a row-wise optimizer touches only those
rows, so a step costs O(rows used), not O(rows). The pieces:

- :func:`param_groups`: dense weights split into decay / no-decay groups, each pool's tables in a group of
  their own (the pool's ``lr`` and ``weight_decay``); sparse-mode pools go to a separate list.
- :class:`LazyAdam`, :class:`RowwiseAdagrad`, :class:`RowwiseSGD` (in :mod:`memzoo.training.rowwise_optim`, re-exported
  here): row-wise optimizers accepting sparse (and dense) gradients, also on host and memory-parallel tables.
- :class:`OptimizerBundle`: the dense optimizer and the row-wise one as ONE ``torch.optim.Optimizer``, so
  Lightning's automatic optimization, LR schedulers and checkpoints see a single optimizer.
- :func:`build_optimizer`: all of the above from a model and a dense optimizer factory (the YAML's ``optimizer``).
- :func:`prefer_fused`: torch's fused Adam/AdamW step where a config leaves the implementation to torch.
- :func:`clip_dense_grad_norm_`: gradient clipping that skips sparse gradients (``clip_grad_norm_`` rejects them).
- :func:`keep_host_state_on_host`: the optimizer state of host tables (``table_device: host``) back next to them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from memzoo.blocks.pool import find_pools
from memzoo.training.rowwise_optim import LazyAdam, RowwiseAdagrad, RowwiseSGD

ParamGroup = dict[str, Any]
OptimizerFactory = Callable[[Iterable], Optimizer]

__all__ = [
    "SPARSE_OPTIMIZERS",
    "LazyAdam",
    "OptimizerBundle",
    "RowwiseAdagrad",
    "RowwiseSGD",
    "build_optimizer",
    "prefer_fused",
    "clip_dense_grad_norm_",
    "keep_host_state_on_host",
    "param_groups",
]


# ----------------------------------------------------------------------------------------------- groups


def param_groups(model: nn.Module) -> tuple[list[ParamGroup], list[ParamGroup]]:
    """``(dense_groups, sparse_groups)`` covering every trainable parameter of ``model`` exactly once.

    Dense groups: ``"decay"`` (weights with ``ndim >= 2``: linears, embeddings, sub-keys; the optimizer's
    default weight decay), ``"no_decay"`` (norm gains, biases; ``weight_decay = 0``), then one group per
    ``update: dense`` pool. Sparse groups: one per ``update: sparse`` pool. A pool group holds the pool's tables
    with ``weight_decay = pool.weight_decay`` and ``lr = pool.lr`` (no ``lr`` key when the pool's is ``None``:
    the optimizer's base lr applies), and ``lr_scale`` when the pool's is not 1 (:func:`build_optimizer` multiplies
    the group's lr by it). Each group has a ``"name"`` (pools: their module path, ``pools.<name>``)
    for logging. Empty groups are left out. A pool shared by several layers is found once, so its tables are in
    one group once.
    """
    pools = find_pools(model)
    table_ids = {id(table) for pool in pools.values() for table in pool.tables().values()}
    decay, no_decay = [], []
    for param in model.parameters():  # tied / shared parameters come once
        if param.requires_grad and id(param) not in table_ids:
            (decay if param.ndim >= 2 else no_decay).append(param)
    dense: list[ParamGroup] = []
    if decay:
        dense.append({"params": decay, "name": "decay"})
    if no_decay:
        dense.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    sparse: list[ParamGroup] = []
    for name, pool in pools.items():
        tables = [table for table in pool.tables().values() if table.requires_grad]
        if not tables:
            continue
        group: ParamGroup = {"params": tables, "weight_decay": pool.weight_decay, "name": name}
        if pool.lr is not None:
            group["lr"] = pool.lr
        if pool.lr_scale != 1.0:
            group["lr_scale"] = pool.lr_scale  # applied by build_optimizer once the optimizer's lr is known
        (sparse if pool.sparse else dense).append(group)
    return dense, sparse


SPARSE_OPTIMIZERS: dict[str, type[Optimizer]] = {"lazy_adam": LazyAdam, "rowwise_adagrad": RowwiseAdagrad}


# ----------------------------------------------------------------------------------------------- the bundle


class _BundleState(MutableMapping):
    """``bundle.state``: a view of the member optimizers' states, keyed by parameter (each param has one owner)."""

    def __init__(self, optimizers: Sequence[Optimizer]):
        self._optimizers = optimizers

    def _owner(self, param: torch.Tensor) -> Optimizer:
        for optimizer in self._optimizers:
            if any(p is param for group in optimizer.param_groups for p in group["params"]):
                return optimizer
        raise KeyError(f"parameter of shape {tuple(param.shape)} is not optimized by this OptimizerBundle")

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        return self._owner(param).state[param]

    def __setitem__(self, param: torch.Tensor, value: dict[str, Any]) -> None:
        self._owner(param).state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._owner(param).state[param]

    def __contains__(self, param: object) -> bool:
        return any(param in optimizer.state for optimizer in self._optimizers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class OptimizerBundle(Optimizer):
    """Several optimizers over disjoint parameters, acting as one (e.g. AdamW for dense weights + LazyAdam for
    sparse value tables).

    - ``param_groups`` is the concatenation of the members' groups (the same dict objects), so an LR scheduler
      on the bundle scales every group of every member, and ``state`` is a view of the members' states.
    - ``step(closure)`` evaluates the closure once, then steps each member in order; ``zero_grad`` clears all.
    - ``state_dict()`` has torch's usual format (``state`` keyed by parameter index over the concatenated
      groups, ``param_groups``), and ``load_state_dict`` splits it back, so a checkpoint round trip is exact; it
      also takes the state keyed by parameter name that ``torch.distributed.checkpoint`` loads (sharded
      checkpoints of memory-parallel runs).
    """

    def __init__(self, optimizers: Sequence[Optimizer]):
        optimizers = list(optimizers)
        if not optimizers or not all(isinstance(o, Optimizer) for o in optimizers):
            raise TypeError(f"OptimizerBundle needs one or more torch.optim.Optimizer, got {optimizers!r}")
        self.optimizers = optimizers
        self._building = True
        super().__init__([group for o in optimizers for group in o.param_groups], defaults={})
        self._building = False
        self.param_groups = [group for o in optimizers for group in o.param_groups]
        self.state = _BundleState(self.optimizers)

    def add_param_group(self, param_group: ParamGroup) -> None:
        if not self._building:
            raise TypeError(
                "OptimizerBundle cannot take new parameter groups (no member would step them); add the group to "
                "one of bundle.optimizers and build a new bundle"
            )
        super().add_param_group(param_group)  # torch's checks: leaf tensors, each parameter in one group only

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer in self.optimizers:
            member = optimizer.state_dict()
            state.update({index + offset: value for index, value in member["state"].items()})
            groups += [{**group, "params": [i + offset for i in group["params"]]} for group in member["param_groups"]]
            offset += sum(len(group["params"]) for group in optimizer.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"OptimizerBundle: the state dict has {len(saved_groups)} parameter groups but this bundle has "
                f"{len(self.param_groups)} ({[g.get('name') for g in self.param_groups]}); was it saved from a "
                f"model with the same pools and update modes?"
            )
        start = offset = 0
        for optimizer in self.optimizers:
            n_groups = len(optimizer.param_groups)
            n_params = sum(len(group["params"]) for group in optimizer.param_groups)
            groups = saved_groups[start : start + n_groups]
            indices = {i for group in groups for i in group["params"]}

            def own(key: int | str, offset: int = offset) -> int | str:  # positions shift, names stay
                return key - offset if isinstance(key, int) else key

            optimizer.load_state_dict({
                "state": {own(i): value for i, value in state_dict["state"].items() if i in indices},
                "param_groups": [{**group, "params": [own(i) for i in group["params"]]} for group in groups],
            })
            start += n_groups
            offset += n_params
        # members replaced their group dicts; keep the bundle's list object (others hold a reference to it)
        self.param_groups[:] = [group for o in self.optimizers for group in o.param_groups]


# ----------------------------------------------------------------------------------------------- entry points


#: the optimizers :func:`prefer_fused` switches to their fused step, and the devices it does so on
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
FUSED_DEVICES = ("cpu", "cuda")


def prefer_fused(optimizer: Optimizer) -> Optimizer:
    """``optimizer`` rebuilt with torch's fused implementation (``fused=True``) where its settings leave the choice
    to torch, else ``optimizer`` itself.

    Rebuilt: a :data:`FUSED_OPTIMIZERS` instance with ``fused`` and ``foreach`` unset (``None``), neither
    ``capturable`` nor ``differentiable``, no state yet, and every parameter a plain floating-point tensor on a
    :data:`FUSED_DEVICES` device (not a DTensor). The update is the same; the fused step makes one pass over each
    parameter where the default CPU step makes about ten (``lerp``, ``mul``, ``sqrt``, ``div``, ``addcdiv`` ...), which
    on the CPU saves a third of the step of a model whose memory tables take dense updates (UltraMemV2's private
    tables; ``tools/bench_blocks.py``). Results differ from the unfused step in the last bits only. An explicit
    ``fused: false`` or ``foreach`` in the config is kept; a resumed checkpoint restores the implementation it was
    trained with (the flag is part of each parameter group's state)."""
    if type(optimizer) not in FUSED_OPTIMIZERS or optimizer.state:
        return optimizer
    settings = optimizer.defaults
    if any(settings.get(key) is not None for key in ("fused", "foreach")) or any(
            settings.get(key) for key in ("capturable", "differentiable")):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
                             and p.device.type in FUSED_DEVICES for p in params):
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW keeps defaults its constructor does not take
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    return type(optimizer)(groups, **{**kwargs, "fused": True})


def build_optimizer(
    model: nn.Module,
    optimizer_factory: OptimizerFactory,
    sparse_optimizer: str = "lazy_adam",
    sparse_kwargs: dict[str, Any] | None = None,
) -> Optimizer:
    """The optimizer of ``model``: ``optimizer_factory(dense_groups)`` for everything but sparse-mode pools, bundled
    with a row-wise ``sparse_optimizer`` (``lazy_adam`` | ``rowwise_adagrad``) for those. An Adam/AdamW factory that
    leaves ``fused`` and ``foreach`` unset gets torch's fused step (:func:`prefer_fused`).

    Returns the plain dense optimizer when the model has no sparse pool. The row-wise optimizer's base lr (for
    pools with ``lr: null``) is the dense optimizer's ``lr`` unless ``sparse_kwargs`` sets one; ``sparse_kwargs``
    (e.g. ``betas``, ``eps``) go to its constructor.
    """
    if sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(f"sparse_optimizer must be one of {sorted(SPARSE_OPTIMIZERS)}, got {sparse_optimizer!r}")
    dense_groups, sparse_groups = param_groups(model)
    if not dense_groups and not sparse_groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    dense = None
    if dense_groups:
        dense = optimizer_factory(dense_groups)
        if not isinstance(dense, Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(dense).__name__}")
        dense = prefer_fused(dense)
        _apply_lr_scales(dense)
    if not sparse_groups:
        return dense
    kwargs = dict(sparse_kwargs or {})
    if "lr" not in kwargs and dense is not None and "lr" in dense.defaults:
        kwargs["lr"] = float(dense.defaults["lr"])
    try:
        sparse = SPARSE_OPTIMIZERS[sparse_optimizer](sparse_groups, **kwargs)
    except TypeError as err:
        raise TypeError(f"sparse optimizer {sparse_optimizer!r} rejected sparse_kwargs {sparse_kwargs}: {err}") from err
    _apply_lr_scales(sparse)
    return sparse if dense is None else OptimizerBundle([dense, sparse])


def keep_host_state_on_host(optimizer: Optimizer, model: nn.Module) -> int:
    """Moves every optimizer state tensor of a host table (pools with ``table_device: host``) that is not on its
    table's device back there; returns how many moved.

    Lightning moves a restored optimizer state to the accelerator (``_optimizer_to_device``); ``LanguageModel``
    calls this at the start of training, so a resumed run updates host tables on the host again. (The state
    crosses to the accelerator once during that restore, so it must fit there.)
    """
    host = {id(t) for pool in find_pools(model).values() if pool.on_host for t in pool.tables().values()}
    moved = 0
    for param, state in optimizer.state.items():
        if id(param) not in host or not isinstance(state, MutableMapping):
            continue
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.device != param.device:
                state[key] = value.to(param.device)
                moved += 1
    return moved
def _apply_lr_scales(optimizer: Optimizer) -> None:
    """Multiplies the lr of each group that carries a pool's ``lr_scale`` (its lr is final only once the
    optimizer has filled in its defaults); schedulers built afterwards scale from there."""
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] = group["lr"] * group["lr_scale"]


def clip_dense_grad_norm_(
    optimizer_or_params: Optimizer | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the DENSE gradients only; returns their total norm.

    ``clip_grad_norm_`` fails on sparse gradients (``linalg_vector_norm`` has no sparse kernel), so sparse-mode
    value tables are left unclipped: their row-wise optimizers normalise per row anyway. Pass an optimizer (all
    its groups' parameters) or an iterable of parameters.
    """
    if isinstance(optimizer_or_params, Optimizer):
        params = [p for group in optimizer_or_params.param_groups for p in group["params"]]
    else:
        params = list(optimizer_or_params)
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    if len({id(p.grad.device_mesh) for p in dense if isinstance(p.grad, DTensor)}) > 1:
        return _clip_grad_norm_across_meshes_(dense, max_norm, norm_type)  # memory parallelism
    return torch.nn.utils.clip_grad_norm_(dense, max_norm, norm_type=norm_type)


def _clip_grad_norm_across_meshes_(params: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """``clip_grad_norm_`` for gradients that are DTensors on DIFFERENT meshes (memory parallelism: FSDP2's over all
    ranks, the value tables' over ``memory_parallel``), which torch's cannot stack: each mesh's total norm is made
    global first (``full_tensor``), then they are combined. Returns the global total norm (a plain tensor)."""
    by_mesh: dict[int, list[torch.Tensor]] = {}
    for param in params:
        by_mesh.setdefault(id(getattr(param.grad, "device_mesh", None)), []).append(param.grad)
    norms = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in params:
        grad = param.grad
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef.to(grad.dtype))
    return total
