"""The block registry: registration, lookup errors, hyperparameter checks, and the three plugin routes."""

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from memzoo.blocks import registry
from memzoo.blocks.base import Block
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
    class NeedsWidth(Block):
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

    class NoDim(Block):
        def __init__(self, width: int):
            super().__init__()

    with pytest.raises(TypeError, match="must accept `dim`"):
        register_block("nodim")(NoDim)

    class Other(Block):
        def __init__(self, dim: int):
            super().__init__()

    with pytest.raises(ValueError, match="already registered"):
        register_block("dense")(Other)
    register_block("dense", override=True)(Other)
    assert get_block("dense") is Other

    class PlainModule(nn.Module):
        def __init__(self, dim: int):
            super().__init__()

    with pytest.raises(TypeError, match="not a memzoo Block; subclass memzoo.Block"):
        register_block("plain")(PlainModule)


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
    with pytest.raises(UnknownBlockError, match="not a memzoo Block"):
        get_block("torch.nn.Linear")


USER_BLOCK = textwrap.dedent(
    '''
    from memzoo import Block, register_block

    @register_block("{name}")
    class Doubler(Block):
        """Returns 2x."""
        def __init__(self, dim: int, scale: float = 2.0):
            super().__init__()
            self.scale = scale
        def forward(self, x, ctx=None):
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


def test_presets_are_their_blocks_with_the_papers_settings_and_take_overrides():
    memory_plus = create_block("memory_plus", dim=16, n_keys=4, knn=2, k_dim=8)
    assert type(memory_plus) is get_block("product_key_memory")
    assert memory_plus.hparams["block"] == "memory_plus"
    # qk-norm, 4 heads and the SiLU gate as the paper (see memzoo.blocks.presets); the ungated layer is one key away
    assert (memory_plus.gate, memory_plus.router.qk_norm, memory_plus.heads) == ("silu", True, 4)
    assert memory_plus.gate_proj is not None and memory_plus.out_proj is not None  # W_2 (y ⊙ silu(W_1 x))
    ungated = create_block("memory_plus", dim=16, n_keys=4, knn=2, k_dim=8, gate="none")
    assert ungated.gate == "none" and ungated.gate_proj is None and ungated.out_proj is None  # y (value_dim == dim)
    pkm = create_block("pkm", dim=16, n_keys=4, knn=2, k_dim=8, heads=2)  # an override of a preset setting
    assert (pkm.gate, pkm.router.query_norm_kind, pkm.heads) == ("none", "layernorm", 2)
    entry = registry.block_entry("pkm")
    assert entry.preset_of == "product_key_memory" and entry.settings["query_norm"] == "layernorm"
    assert "Lample" in entry.paper
    defaults = {hp.name: hp.default for hp in block_hyperparameters("memory_plus")}
    assert defaults["gate"] == "silu" and defaults["qk_norm"] is True
    with pytest.raises(BlockConfigError, match=r"'gaet' \(did you mean 'gate'\?\)"):
        create_block("memory_plus", dim=16, n_keys=4, gaet="silu")


def test_preset_registration_is_checked(clean_registry):
    with pytest.raises(ValueError, match="not a registered block class name"):
        registry.register_preset("x", "memory_plus", {}, paper="")
    with pytest.raises(ValueError, match=r"has no hyperparameter\(s\) \['hiden'\]"):
        registry.register_preset("x", "dense", {"hiden": 3}, paper="")
    registry.register_preset("wide_dense", "dense", {"hidden": 48}, paper="a study")
    assert create_block("wide_dense", dim=8).hidden == 48
    assert "wide_dense" in list_blocks("wide")


def test_pool_names_resolve_through_the_pools_given_and_are_recorded_by_name():
    from memzoo.blocks.pool import MemoryPool

    pool = MemoryPool(4, 8)
    block = create_block("memory_plus", dim=16, pools={"shared": pool}, pool="shared", knn=2, k_dim=8)
    assert block.pool is pool and block.hparams["pool"] == "shared"
    private = create_block("pkm", dim=16, n_keys=4, knn=2, k_dim=8)
    assert private.hparams["pool"] is None
    with pytest.raises(BlockConfigError, match=r"pool 'other' is not defined; defined pools: shared"):
        create_block("memory_plus", dim=16, pools={"shared": pool}, pool="other")
    with pytest.raises(BlockConfigError, match="block 'dense' does not read memory pools; drop `pool:`"):
        create_block("dense", dim=16, pools={"shared": pool}, pool="shared")


def test_block_contract_defaults():
    class Plain(Block):
        def __init__(self, dim: int):
            super().__init__()
            self.linear = nn.Linear(dim, dim)

        def forward(self, x, ctx=None):
            return self.linear(x)

    block = Plain(4)
    assert block.aux_losses() == {} and block.table_bytes_read_per_token() == 0
    assert block.active_parameters() == 20 and block.flops_per_token() == 40
    assert not Plain.declares_flops() and get_block("dense").declares_flops()
    assert block.hparams is None and not Plain.reads_pool and get_block("memory_plus").reads_pool


def test_token_indexed_block_gets_vocab_size_and_a_decode_state(clean_registry):
    """The contract's token-id side: ``needs_vocab_size`` brings the model's vocabulary size, and ``ctx.state``
    carries a block's history across KV-cache decode steps (here the previous token id of a bigram table), so
    cached decoding equals recomputation; without a cache ``ctx.state`` is None."""
    from memzoo.model.config import ModelConfig
    from memzoo.model.transformer import Transformer

    states_seen = []

    @register_block("previous_token_table")
    class PreviousTokenTable(Block):
        needs_vocab_size = True

        def __init__(self, dim: int, vocab_size: int):
            super().__init__()
            self.vocab_size = vocab_size
            self.table = nn.Embedding(vocab_size + 1, dim)  # row vocab_size: "no previous token"

        def forward(self, x, ctx=None):
            ids = ctx.token_ids
            first = torch.full_like(ids[:, :1], self.vocab_size)
            if ctx.state is not None:
                first = ctx.state.get("last", first)
                ctx.state["last"] = ids[:, -1:]
            states_seen.append(ctx.state is None)
            return self.table(torch.cat([first, ids[:, :-1]], dim=1))

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=16,
                                    block="previous_token_table")).eval()
    assert model.layers[0].ffn.hparams == {"block": "previous_token_table", "vocab_size": 50}
    with pytest.raises(BlockConfigError, match="needs the model's vocab_size"):
        create_block("previous_token_table", dim=16)
    prompt = torch.randint(0, 50, (2, 4))
    cached = model.generate(prompt, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, use_cache=False))
    with torch.no_grad():
        full = model(cached)
        caches = model.new_caches(2, cached.shape[1])
        steps = [model(cached[:, :4], caches)] + [model(cached[:, i : i + 1], caches) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert True in states_seen and False in states_seen
    assert caches[0].block_state is not caches[1].block_state  # one state per layer
