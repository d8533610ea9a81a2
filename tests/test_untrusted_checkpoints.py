"""Files a user hands memzoo are data, never code: a crafted checkpoint whose pickle would run a command is refused
with one line naming it, on every path that reads checkpoints, and the command never runs (its marker file stays
absent). Crafted inputs:

- ``evil.ckpt``: a ``torch.save`` zip whose pickle calls ``os.system`` (a Lightning-looking checkpoint);
- ``evil_dir/``: a sharded folder whose ``.metadata`` pickle calls ``os.system``, next to a harmless ``meta.pt``;
- a real memzoo sharded checkpoint with one optimizer ``param_groups`` item replaced by such a pickle (its index is
  legitimate: DCP's own loader unpickles that item with ``weights_only=False``).

Positive case: a sharded checkpoint memzoo wrote reads through the restricted unpickler and resumes.
A static check fails on any ``torch.load`` without a literal ``weights_only=True`` and any other unpickling in
``src/memzoo``.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mp_workers
from memzoo.build import build_language_model
from memzoo.cli import main
from memzoo.parallel.checkpoint import ShardedCheckpointError, read_sharded_weights
from memzoo.parallel.checkpoint_metadata import (
    UntrustedMetadataError,
    load_sharded_state,
    read_checkpoint_metadata,
)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "memzoo"
REFUSED = "is refused"

TINY = textwrap.dedent(
    """
    trainer: {max_steps: 1, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
    model:
      class_path: memzoo.LanguageModel
      init_args:
        architecture: {dim: 16, n_layers: 1, n_heads: 2, max_seq_len: 32}
    data:
      class_path: memzoo.data.FactsDataModule
      init_args: {n_entities: 4, block_size: 16, batch_size: 2, recall_samples: 2}
    """
)


class RunsCommand:
    """Pickles as ``os.system("touch <marker>")``: unpickling it without an allowlist creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(RunsCommand(marker), buffer)
    return buffer.getvalue()


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    """``(marker, evil.ckpt, evil_dir)`` in tmp_path; the test runs in tmp_path (runs/ and logs land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.embed.weight": torch.zeros(2, 2)}, "hyper_parameters": {"x": RunsCommand(marker)},
                "epoch": 0, "global_step": 0}, ckpt)
    folder = tmp_path / "evil_dir"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    (tmp_path / "tiny.yaml").write_text(TINY)
    strategy = "memzoo.parallel.strategy.MemoryParallelStrategy"
    (tmp_path / "tiny_mp.yaml").write_text(
        TINY.replace("devices: 1,", f"devices: 1, strategy: {{class_path: {strategy}, init_args: {{memory_parallel: 1}}}},")
    )
    yield marker, ckpt, folder
    assert not marker.exists(), "the crafted pickle ran"


def _refused(err: BaseException | pytest.ExceptionInfo) -> str:
    text = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    assert REFUSED in text and "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A real sharded checkpoint folder of a 2-step one-process MemoryParallelStrategy run (mp_workers.MODEL)."""
    out = tmp_path_factory.mktemp("sharded")
    mp_workers.in_this_process(lambda rank, world: mp_workers.fit(2, 1, 1, 4, save_dir=str(out)))
    return out / "step=2.ckpt"


def _with_malicious_item(source: Path, target: Path, marker: Path) -> Path:
    """A copy of the sharded folder ``source`` whose ``optimizer_0.param_groups.0.lr`` item is a pickle that runs a
    command; its index names only allowed classes."""
    shutil.copytree(source, target)
    metadata = read_checkpoint_metadata(target)
    key = next(k for k in metadata.storage_data if k.fqn == "optimizer_0.param_groups.0.lr")
    info = metadata.storage_data[key]
    shard = target / info.relative_path
    payload = _payload(marker)
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(payload)
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(payload))
    (target / ".metadata").write_bytes(pickle.dumps(metadata))
    return target


# ----------------------------------------------------------------------------------------------- the Python API


def test_memory_parallel_strategy_refuses_a_crafted_ckpt_and_folder(crafted):
    marker, ckpt, folder = crafted
    for path in (ckpt, folder):
        with pytest.raises(ShardedCheckpointError) as err:
            mp_workers.in_this_process(lambda rank, world, p=path: mp_workers.fit(4, 1, 1, 4, ckpt=str(p)))
        _refused(err)
    from memzoo.parallel.strategy import MemoryParallelStrategy

    with pytest.raises(ShardedCheckpointError, match="weights_only=False is refused"):
        MemoryParallelStrategy(1).load_checkpoint(ckpt, weights_only=False)


def test_a_crafted_item_of_a_real_sharded_folder_is_refused(sharded, crafted, tmp_path):
    """DCP's own loader would run the item (shown first: the crafted folder is a real attack); memzoo's reader, the
    strategy's resume and the export's reader refuse it."""
    import torch.distributed.checkpoint as dcp

    marker = crafted[0]
    folder = _with_malicious_item(sharded, tmp_path / "item.ckpt", marker)
    dcp.load({"optimizer_0": {"param_groups": [{"lr": 0.0}]}}, checkpoint_id=folder, no_dist=True)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UntrustedMetadataError, match="optimizer_0.param_groups.0.lr.*posix.system"):
        load_sharded_state({"optimizer_0": {"param_groups": [{"lr": 0.0}]}}, folder, no_dist=True)
    with pytest.raises(ShardedCheckpointError) as err:
        mp_workers.in_this_process(lambda rank, world: mp_workers.fit(4, 1, 1, 4, ckpt=str(folder)))
    _refused(err)


def test_init_from_load_pretrained_slot_stats_and_checkpoint_io_refuse(crafted, tmp_path):
    from memzoo import load_pretrained
    from memzoo.export.checkpoint_io import AtomicCheckpointIO
    from memzoo.export.errors import PretrainedFormatError
    from memzoo.model.retrofit import InitFromError
    from memzoo.safe_load import RefusedPickleError
    from memzoo.training.slot_stats import SlotStats, SlotStatsError

    marker, ckpt, _ = crafted
    with pytest.raises(InitFromError) as err:
        build_language_model(architecture={"dim": 16, "n_layers": 1, "n_heads": 2}, init_from=str(ckpt))
    _refused(err)
    with pytest.raises(SlotStatsError) as err:
        SlotStats.load(ckpt)
    _refused(err)
    with pytest.raises(RefusedPickleError) as err:
        AtomicCheckpointIO().load_checkpoint(ckpt)
    _refused(err)
    hf = tmp_path / "hf"  # a Llama folder with pickled weights only: never unpickled
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (hf / "pytorch_model.bin").write_bytes(_payload(marker))
    with pytest.raises(PretrainedFormatError):
        load_pretrained(hf)
    with pytest.raises(PretrainedFormatError):
        load_pretrained(ckpt)


# ----------------------------------------------------------------------------------------------- the command line


def test_cli_verbs_refuse_crafted_checkpoints_in_one_line(crafted, tmp_path):
    marker, ckpt, folder = crafted
    for args in (
        ["fit", "--config", "tiny.yaml", "--ckpt_path", str(ckpt)],
        ["fit", "--config", "tiny_mp.yaml", "--ckpt_path", str(ckpt)],
        ["fit", "--config", "tiny_mp.yaml", "--ckpt_path", str(folder)],
        ["fit", "--config", "tiny.yaml", "--ckpt_path", str(folder)],
        ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out1")],
        ["export", "--ckpt", str(folder), "--out", str(tmp_path / "out2")],
        ["slot-stats", "--config", "tiny.yaml", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "s.pt")],
    ):
        with pytest.raises((Exception, SystemExit)) as err:
            main(args)
        _refused(err)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_console_script_refuses_a_crafted_folder_in_one_line(crafted, tmp_path, monkeypatch, capsys):
    """What a user sees (the console script's formatting, in-process): one ``memzoo: error:`` line, exit 2."""
    from memzoo.cli import entry_point

    _, _, folder = crafted
    monkeypatch.setattr(sys, "argv", ["memzoo", "export", "--ckpt", str(folder), "--out", str(tmp_path / "out")])
    assert entry_point() == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("memzoo: error:")]
    assert len(errors) == 1 and REFUSED in errors[0] and "posix.system" in errors[0], stderr
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------------------------- positive case


def test_a_real_sharded_checkpoint_reads_through_the_allowlist_and_resumes(sharded, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    mine, theirs = read_checkpoint_metadata(sharded), FileSystemReader(str(sharded)).read_metadata()
    assert mine.state_dict_metadata == theirs.state_dict_metadata
    assert mine.storage_data == theirs.storage_data
    weights = read_sharded_weights(sharded)
    assert weights["global_step"] == 2 and weights["state_dict"]["model.pools.memory.values"].shape == (64, 12)
    steps = []
    mp_workers.in_this_process(
        lambda rank, world: steps.append(mp_workers.fit(4, 1, 1, 4, ckpt=str(sharded))[1].global_step)
    )
    assert steps == [4]


def test_a_shard_outside_the_folder_is_refused(sharded, tmp_path):
    folder = tmp_path / "escape.ckpt"
    shutil.copytree(sharded, folder)
    metadata = read_checkpoint_metadata(folder)
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="../../etc/passwd")
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UntrustedMetadataError, match="not a file of the folder itself"):
        read_checkpoint_metadata(folder)


# ----------------------------------------------------------------------------------------------- static check


def _unsafe_loads(path: Path) -> list[str]:
    """``file:line what`` for every ``torch.load`` call without a literal ``weights_only=True``, every use of
    ``pickle.load``/``loads``/``Unpickler``, and every DCP reader or load outside the restricted-unpickler module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    restricted = path.name == "checkpoint_metadata.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            if owner == "torch" and name == "load":
                literal = [k for k in node.keywords if k.arg == "weights_only"]
                if not literal or not (isinstance(literal[0].value, ast.Constant) and literal[0].value.value is True):
                    found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if owner == "dcp" and name in ("load", "load_state_dict") and not restricted:
                found.append(f"{path.name}:{node.lineno} dcp.{name} outside checkpoint_metadata.py")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle":
            if node.attr in ("load", "loads", "Unpickler") and not restricted:
                found.append(f"{path.name}:{node.lineno} pickle.{node.attr} outside checkpoint_metadata.py")
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch.distributed.checkpoint"):
            names = {a.name for a in node.names}
            if names & {"load", "loads", "Unpickler", "FileSystemReader", "load_state_dict"} and not restricted:
                found.append(f"{path.name}:{node.lineno} imports {sorted(names)} from {node.module}")
        if isinstance(node, ast.Name) and node.id == "FileSystemReader" and not restricted:
            found.append(f"{path.name}:{node.lineno} FileSystemReader outside checkpoint_metadata.py")
    return found


def test_no_unrestricted_unpickling_in_the_source():
    found = [hit for path in sorted(SOURCE.rglob("*.py")) for hit in _unsafe_loads(path)]
    assert not found, "loads that may run code:\n" + "\n".join(found)


def test_the_static_check_sees_unsafe_loads(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch\nimport torch.distributed.checkpoint as dcp\n"
        "from torch.distributed.checkpoint import FileSystemReader\n"
        "def f(p, w):\n"
        "    torch.load(p)\n    torch.load(p, weights_only=bool(w))\n    torch.load(p, weights_only=True)\n"
        "    pickle.loads(b'')\n    dcp.load({}, checkpoint_id=p)\n"
    )
    lines = sorted(int(hit.split(":")[1].split()[0]) for hit in _unsafe_loads(bad))
    assert lines == [3, 5, 6, 8, 9], _unsafe_loads(bad)


def _getattr_pickle(owner_module: str, owner: str, attribute: str) -> bytes:
    """A pickle of ``getattr(owner, attribute)``, as Python 3.11.0-3.11.4 write an Enum member."""
    return (b"\x80\x04" + pickle.dumps("builtins", 4)[2:-1] + pickle.dumps("getattr", 4)[2:-1] + b"\x93"
            + pickle.dumps(owner_module, 4)[2:-1] + pickle.dumps(owner, 4)[2:-1] + b"\x93"
            + pickle.dumps(attribute, 4)[2:-1] + b"\x86R.")


def test_enum_members_pickled_through_getattr_are_read_and_nothing_else_is():
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from memzoo.parallel.checkpoint_metadata import _MetadataUnpickler as RestrictedUnpickler

    member = next(iter(_MEM_FORMAT_ENCODING))
    ok = _getattr_pickle("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", member.name)
    assert pickle.loads(ok) is member  # the plain unpickler agrees on what the bytes say
    assert RestrictedUnpickler(io.BytesIO(ok)).load() is member
    for owner, attribute in (("Metadata", "__init__"), ("_MEM_FORMAT_ENCODING", "__class__"),
                             ("_MEM_FORMAT_ENCODING", "_member_map_")):
        bad = _getattr_pickle("torch.distributed.checkpoint.metadata", owner, attribute)
        with pytest.raises(UntrustedMetadataError, match="only members of allowlisted Enum classes"):
            RestrictedUnpickler(io.BytesIO(bad)).load()
