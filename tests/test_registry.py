"""The block registry: registration, lookup errors, hyperparameter checks, and the three plugin routes."""

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from memzoo import registry
from memzoo.registry import (
    BlockConfigError,
    UnknownBlockError,
    block_hyperparameters,
    create_block,
    get_block,
    list_blocks,
    load_plugins,
    register_block,
)


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_dense_is_registered_and_builds():
    assert "dense" in list_blocks()
    block = create_block("dense", dim=32, hidden=64)
    assert block(torch.randn(2, 3, 32)).shape == (2, 3, 32)


def test_unknown_name_lists_known_blocks_and_closest_match():
    with pytest.raises(UnknownBlockError) as err:
        get_block("dnse")
    message = str(err.value)
    assert "'dnse'" in message and "Did you mean 'dense'" in message and "dense" in message.split("Known blocks:")[1]


def test_unknown_and_missing_hyperparameters_are_named(clean_registry):
    with pytest.raises(BlockConfigError, match=r"'hiden' \(did you mean 'hidden'\?\)"):
        create_block("dense", dim=8, hiden=4)

    @register_block("needs_width")
    class NeedsWidth(nn.Module):
        def __init__(self, dim: int, width: int):
            super().__init__()

    with pytest.raises(BlockConfigError, match="needs hyperparameter.*width"):
        create_block("needs_width", dim=8)


def test_block_rejecting_values_gets_wrapped_with_its_name():
    with pytest.raises(BlockConfigError, match="block 'dense'.*dropout"):
        create_block("dense", dim=8, dropout=2.0)


def test_register_validates_name_class_and_duplicates(clean_registry):
    with pytest.raises(ValueError, match="lowercase"):
        register_block("Bad Name")
    with pytest.raises(TypeError, match="nn.Module"):
        register_block("x")(object)

    class NoDim(nn.Module):
        def __init__(self, width: int):
            super().__init__()

    with pytest.raises(TypeError, match="must accept `dim`"):
        register_block("nodim")(NoDim)

    class Other(nn.Module):
        def __init__(self, dim: int):
            super().__init__()

    with pytest.raises(ValueError, match="already registered"):
        register_block("dense")(Other)
    register_block("dense", override=True)(Other)
    assert get_block("dense") is Other


def test_list_filter_and_hyperparameters():
    assert list_blocks("den") == ["dense"]
    assert list_blocks("d*") == [n for n in list_blocks() if n.startswith("d")]
    names = [hp.name for hp in block_hyperparameters("dense")]
    assert names == ["hidden", "dropout", "bias"]


def test_dotted_class_path_resolves_and_bad_path_errors():
    assert get_block("memzoo.blocks.dense.DenseMLP").__name__ == "DenseMLP"
    with pytest.raises(UnknownBlockError, match="could not be imported"):
        get_block("memzoo.blocks.dense.Nope")
    with pytest.raises(UnknownBlockError, match="not an nn.Module"):
        get_block("memzoo.blocks.dense.swiglu_hidden")


USER_BLOCK = textwrap.dedent(
    '''
    import torch.nn as nn
    from memzoo import register_block

    @register_block("{name}")
    class Doubler(nn.Module):
        """Returns 2x."""
        def __init__(self, dim: int, scale: float = 2.0):
            super().__init__()
            self.scale = scale
        def forward(self, x):
            return self.scale * x
    '''
)


def test_plugin_file_registers_its_blocks(tmp_path, clean_registry):
    path = tmp_path / "my_blocks.py"
    path.write_text(USER_BLOCK.format(name="doubler"))
    load_plugins([str(path)])
    block = create_block("doubler", dim=4, scale=3.0)
    assert torch.equal(block(torch.ones(1, 1, 4)), torch.full((1, 1, 4), 3.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plugins([str(tmp_path / "missing.py")])
    with pytest.raises(ImportError, match="neither a .py file nor an importable module"):
        load_plugins(["no_such_module_anywhere"])


def test_plugin_module_name(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "user_pkg_blocks.py").write_text(USER_BLOCK.format(name="pkg_doubler"))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins("user_pkg_blocks")
    assert "pkg_doubler" in list_blocks()
    sys.modules.pop("user_pkg_blocks", None)


def test_entry_point_plugin(tmp_path, monkeypatch, clean_registry):
    """An installed package advertising a block under the memzoo.blocks entry-point group."""
    (tmp_path / "ep_blocks.py").write_text(USER_BLOCK.format(name="unused_name").replace('@register_block("unused_name")', ""))
    dist = tmp_path / "ep_blocks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-blocks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[memzoo.blocks]\nep_doubler = ep_blocks:Doubler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    assert "ep_doubler" in list_blocks()
    assert create_block("ep_doubler", dim=2).scale == 2.0
    sys.modules.pop("ep_blocks", None)
