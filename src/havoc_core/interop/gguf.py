"""HAVOC -> GGUF, the file llama.cpp (and Ollama, LM Studio...) runs, written with ggml's own Python
writer (the `gguf` package), the tokenizer and chat template inside.

llama.cpp's `llama` architecture rotates adjacent pairs of each head's dimensions; HAVOC, like HF,
rotates halves. The Q and K rows are permuted into llama.cpp's order, as its own HF converter does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from havoc_core.config import HavocConfig
from havoc_core.model.transformer import CONFIG_NAME, load_weights
from havoc_core.pretrained import check_vocab
from havoc_core.tokenizer import HavocTokenizer
from havoc_core.tokenizer.tokenizer import CHAT_TEMPLATE, END, SPECIAL_TOKENS, TOKENIZER_FILE

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # Q8_0 and Q4_0 store rows in blocks of 32 values, each with its own scale

_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight", "attn.wo.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w1.weight": "ffn_gate.weight", "mlp.w2.weight": "ffn_up.weight", "mlp.w3.weight": "ffn_down.weight",
}


def gguf_names(config: HavocConfig) -> dict[str, str]:
    """HAVOC tensor name -> llama.cpp tensor name (a tied LM head is llama.cpp's default: no `output`)."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(config.num_layers):
        names.update({f"layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in _LAYER_NAMES.items()})
    return names


def to_llama_cpp_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K rows from rotate-half order (each head: first halves, then second halves) to adjacent pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def havoc_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, type: str = "f16",
                  tokenizer: str | os.PathLike | None = None) -> Path:
    """Write HAVOC model folder `src` as the GGUF file `dst` of weight type `type` (f32, f16, bf16, q8_0, q4_0;
    norms stay f32, as llama.cpp keeps them). The tokenizer is `tokenizer` or the one beside `src`."""
    import gguf

    src, dst = Path(src), Path(dst)
    if type not in GGUF_TYPES:
        raise ValueError(f"type must be one of {', '.join(GGUF_TYPES)}, got {type!r}")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new output file (nothing was overwritten)")
    config = HavocConfig.load(src / CONFIG_NAME)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else src
    if not (tokenizer_dir / TOKENIZER_FILE).exists():
        raise FileNotFoundError(f"{tokenizer_dir} has no {TOKENIZER_FILE}: a GGUF file carries its tokenizer, so "
                                "pass --tokenizer with the folder the model was trained with")
    check_vocab(config, HavocTokenizer.load(tokenizer_dir), src)
    state, _ = load_weights(src)
    names = gguf_names(config)
    if type in ("q8_0", "q4_0"):
        odd = [(name, tuple(state[name].shape)) for name in names
               if state[name].dim() == 2 and state[name].shape[1] % BLOCK]
        if odd:
            raise ValueError(f"{type} needs rows of a multiple of {BLOCK} values; {odd[0][0]} has shape "
                             f"{odd[0][1]} ({len(odd)} such tensors): export as f16 or f32 instead")

    tmp = dst.with_name(f".{dst.name}.partial")
    writer = gguf.GGUFWriter(tmp, "llama")
    _write_model_keys(writer, gguf, config, type, src.name)
    _write_tokenizer(writer, gguf, json.loads((tokenizer_dir / TOKENIZER_FILE).read_text(encoding="utf-8")), config)
    heads = {"attn.wq.weight": config.attention.num_heads, "attn.wk.weight": config.attention.num_kv_heads}
    for ours, theirs in names.items():
        tensor = state[ours].float()
        permute = next((n for key, n in heads.items() if ours.endswith(key)), None)
        if permute:
            tensor = to_llama_cpp_rope(tensor, permute)
        _add_tensor(writer, gguf, theirs, tensor.numpy(), type if tensor.dim() == 2 else "f32")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _write_model_keys(writer, gguf, config: HavocConfig, type: str, name: str) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_name(name)
    writer.add_file_type(file_types[type])
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.mlp.hidden_dim)
    writer.add_head_count(config.attention.num_heads)
    writer.add_head_count_kv(config.attention.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _write_tokenizer(writer, gguf, spec: dict, config: HavocConfig) -> None:
    """Byte-level BPE as llama.cpp knows it: model "gpt2", GPT-2's pre-tokenizer pattern (HAVOC's
    ByteLevel pre-tokenizer, add_prefix_space off), the special tokens as control tokens."""
    vocab = spec["model"]["vocab"]
    tokens = [None] * config.vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
    if any(t is None for t in tokens):
        raise ValueError(f"the tokenizer has no token for id {tokens.index(None)}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_eot_token_id(SPECIAL_TOKENS.index(END))  # a chat reply ends at <|end|>
    writer.add_add_bos_token(False)  # the chat template writes <|bos|> itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_tensor(writer, gguf, name: str, data: np.ndarray, type: str) -> None:
    if type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                 "q4_0": gguf.GGMLQuantizationType.Q4_0}[type]
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
