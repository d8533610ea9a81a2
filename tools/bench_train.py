"""Training throughput of memzoo (LightningModule + Trainer) against a minimal plain-PyTorch loop, same run.

Both train the same model (the nanoGPT CPU setting by default: 4 layers, 4 heads, width 128, context 64, batch 12)
on the same batches (random windows of a byte-level text, or random tokens without a text) with the same AdamW,
for the same number of steps, after the same warm-up. The headline is the ratio
``memzoo tokens/s ÷ plain tokens/s`` (target ≥ 0.90: Lightning adds no real overhead).

    python tools/bench_train.py [--text ../shared/data/tinyshakespeare.txt] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from memzoo.model.config import ModelConfig
from memzoo.training.module import LanguageModel

MODEL = ModelConfig(vocab_size=258, dim=128, n_layers=4, n_heads=4, max_seq_len=64, dropout=0.0)


def make_batches(text: Path | None, steps: int, batch_size: int, block_size: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size, block_size + 1)`` token windows (bytes of ``text``, or uniform random tokens)."""
    g = torch.Generator().manual_seed(seed)
    if text is not None and text.exists():
        data = torch.frombuffer(bytearray(text.read_bytes()), dtype=torch.uint8).long()
        starts = torch.randint(0, len(data) - block_size - 1, (steps * batch_size,), generator=g)
        windows = torch.stack([data[s : s + block_size + 1] for s in starts.tolist()])
    else:
        windows = torch.randint(0, 256, (steps * batch_size, block_size + 1), generator=g)
    return windows.view(steps, batch_size, block_size + 1)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def plain_loop(batches: torch.Tensor, warmup: int) -> float:
    """Seconds for the timed steps of a minimal loop: forward, loss, backward, clip, step, zero_grad."""
    torch.manual_seed(0)
    model = LanguageModel(MODEL, optimizer=adamw, warmup_steps=0).model
    opt = adamw(model.parameters())
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class _TimingCallback(L.Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def lightning_loop(batches: torch.Tensor, warmup: int, progress_bar: bool) -> float:
    """Seconds for the timed steps of ``Trainer.fit`` on memzoo's LanguageModel (its loss, metrics and logging)."""
    torch.manual_seed(0)
    module = LanguageModel(MODEL, optimizer=adamw, warmup_steps=0)
    flat = batches.flatten(0, 1)
    dataset = TensorDataset(flat[:, :-1], flat[:, 1:])
    loader = DataLoader(
        dataset,
        batch_size=batches.shape[1],
        collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])},
    )
    timer = _TimingCallback(warmup)
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger("/tmp/memzoo_bench_train"),
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.end - timer.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/memzoo this many times; best of each")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batch_size, block = 12, MODEL["max_seq_len"]
    batches = make_batches(args.text, args.steps + args.warmup, batch_size, block, seed=0)
    timed_tokens = args.steps * batch_size * block
    plain, memzoo, memzoo_bar = [], [], []
    for _ in range(args.repeats):  # interleaved so drifts in machine load hit both
        plain.append(plain_loop(batches, args.warmup))
        memzoo.append(lightning_loop(batches, args.warmup, progress_bar=False))
        memzoo_bar.append(lightning_loop(batches, args.warmup, progress_bar=True))
    result = {
        "model": MODEL,
        "batch_size": batch_size,
        "timed_steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "plain_tokens_per_s": timed_tokens / min(plain),
        "memzoo_tokens_per_s": timed_tokens / min(memzoo),
        "memzoo_with_progress_bar_tokens_per_s": timed_tokens / min(memzoo_bar),
    }
    result["ratio_memzoo_vs_plain"] = result["memzoo_tokens_per_s"] / result["plain_tokens_per_s"]
    result["ratio_memzoo_progress_bar_vs_plain"] = (
        result["memzoo_with_progress_bar_tokens_per_s"] / result["plain_tokens_per_s"]
    )
    result["target_met"] = result["ratio_memzoo_vs_plain"] >= 0.90
    print(json.dumps(result, indent=2))
    print()
    print(f"{'loop':<28}{'tokens/s':>12}{'ratio vs plain':>16}")
    print(f"{'plain PyTorch':<28}{result['plain_tokens_per_s']:>12.0f}{1.0:>16.3f}")
    print(f"{'memzoo (Lightning)':<28}{result['memzoo_tokens_per_s']:>12.0f}{result['ratio_memzoo_vs_plain']:>16.3f}")
    print(f"{'memzoo + progress bar':<28}{result['memzoo_with_progress_bar_tokens_per_s']:>12.0f}"
          f"{result['ratio_memzoo_progress_bar_vs_plain']:>16.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
