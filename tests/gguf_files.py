"""Writing tiny GGUF files for tests: a random Llama model's weights in llama.cpp's layout (q/k rows permuted as
llama.cpp's converter does), a byte-level BPE tokenizer with a few merges and a chat template."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: special tokens first (ids 0-2), as SmolLM2's vocabulary has them
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_characters() -> list[str]:
    """The printable character of each byte (GPT-2's byte-level alphabet), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return [table[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + byte_characters() + ["".join(m.split()) for m in MERGES]


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of a q or k projection (Hugging Face's "rotate half" pairs interleaved)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def tiny_llama(tie: bool = True, seed: int = 0, n_layers: int = 2, dim: int = 32, n_heads: int = 4,
               n_kv_heads: int = 2, ffn_dim: int = 48):
    """A random transformers ``LlamaForCausalLM`` (vocabulary of :func:`vocabulary`; by default 2 layers, width 32,
    4 query heads sharing 2 key/value heads)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=dim, intermediate_size=ffn_dim, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_llama_gguf(path: Path, model, dtype: str = "f32", architecture: str = "llama") -> Path:
    """Writes transformers ``LlamaForCausalLM`` ``model`` to ``path`` as a GGUF file (2-D tensors as ``dtype``: f32,
    f16 or q8_0, llama.cpp's 8-bit blocks of 32; ``architecture`` names the GGUF architecture, e.g. a wrong one for
    error tests)."""
    import gguf

    config = model.config
    np_dtype = {"f32": np.float32, "f16": np.float16, "q8_0": np.float32}[dtype]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None)
                              else config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    vocab = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(vocab) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def put(name: str, array: np.ndarray) -> None:
        # norms stay float32, as llama.cpp's converter keeps 1-D tensors
        array = np.ascontiguousarray(array.astype(np.float32 if array.ndim == 1 else np_dtype))
        if dtype == "q8_0" and array.ndim == 2 and array.shape[-1] % 32 == 0:  # others stay f32, as in llama.cpp
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", llama_permute(state[p + "self_attn.q_proj.weight"], config.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", llama_permute(state[p + "self_attn.k_proj.weight"], config.num_key_value_heads))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
