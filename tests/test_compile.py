"""``LanguageModel(compile=...)`` compiles each decoder layer in place in ``configure_model``: parameter names,
checkpoints and exports are the same with and without it, and checkpoints move freely between the two.

These tests use the cheap ``aot_eager`` backend (Dynamo tracing and AOT autograd, no code generation); one test
runs the full inductor backend."""

import dataclasses
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

import memzoo
from memzoo.export.checkpoint_io import AtomicCheckpointIO
from memzoo.export.hf import export_checkpoint
from memzoo.model.config import ModelConfig
from memzoo.training.module import LanguageModel

ARCHITECTURE = ModelConfig(
    vocab_size=258, dim=32, n_layers=2, n_heads=2, max_seq_len=32,
    layers={1: {"block": "memory_plus", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 16}},
    pools={"memory": {"n_keys": 8, "value_dim": 32}},
)
IDS = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))


def loader():
    return DataLoader([{"input_ids": IDS[i, :-1], "labels": IDS[i, 1:]} for i in range(4)], batch_size=2)


def fit(module: LanguageModel, root: Path, steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer


def lm(compile, architecture: ModelConfig = ARCHITECTURE) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(architecture, compile=compile, warmup_steps=0, lr_decay_steps=4)  # one schedule for all runs


def test_compile_keeps_parameter_names_and_compiles_every_layer(tmp_path):
    plain, compiled = lm(False), lm("aot_eager")
    fit(compiled, tmp_path, steps=1)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    assert all(layer._compiled_call_impl is None for layer in plain.model.layers)
    assert not any("_orig_mod" in name for name in compiled.state_dict())


def two_plus_two_steps(root: Path, first, second) -> LanguageModel:
    """2 steps with ``compile=first``, a checkpoint, then steps 3-4 resumed from it with ``compile=second``."""
    trainer = fit(lm(first), root, steps=2)
    trainer.save_checkpoint(root / "half.ckpt")
    resumed = lm(second)
    fit(resumed, root, steps=4, ckpt_path=root / "half.ckpt")
    return resumed


def test_checkpoints_move_between_compiled_and_eager_runs(tmp_path):
    """A compiled run's checkpoint resumes eagerly and the reverse, to the weights of an all-eager resume."""
    reference = two_plus_two_steps(tmp_path / "eager", False, False)
    for first, second in (("aot_eager", False), (False, "aot_eager")):
        resumed = two_plus_two_steps(tmp_path / f"{first}-{second}", first, second)
        for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
            where = f"{first}->{second}: {name}"  # eager runs memzoo's C++ norm/SwiGLU/rotary kernels, compiled
            # graphs PyTorch's ops: rounding differs in the last bits, which four Adam steps may carry to ~1e-6
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}")


def test_export_from_a_compiled_run(tmp_path):
    module = lm("aot_eager")
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    folder = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "export", tokenizer="byte")
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(memzoo.load_pretrained(folder)(IDS), module(IDS), rtol=1e-5, atol=1e-6)


def test_inductor_compiled_training_matches_eager(tmp_path):
    """The one full-inductor test: two training steps with each layer inductor-compiled equal eager ones. One
    layer, Memory+ (each distinct layer is C++ code generated and built, forward and backward: seconds each)."""
    one_layer = dataclasses.replace(ARCHITECTURE, n_layers=1, layers={0: ARCHITECTURE.layers[1]})
    eager, compiled = lm(False, one_layer), lm(True, one_layer)
    fit(eager, tmp_path / "eager", steps=2)
    fit(compiled, tmp_path / "compiled", steps=2)
    for (name, want), got in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
