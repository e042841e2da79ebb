"""Conversion between HAVOC checkpoints and Hugging Face Llama checkpoints (LlamaForCausalLM).

Both sides use the same rotate-half RoPE layout, so conversion is a renaming of tensors: no
weight is permuted. Works on state dicts and config files only; no model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from havoc_core.atomic import atomic_directory
from havoc_core.config import AttentionConfig, HavocConfig, MLPConfig
from havoc_core.model.transformer import CONFIG_NAME, SAFETENSORS_NAME, load_weights
from havoc_core.pretrained import check_vocab
from havoc_core.tokenizer.tokenizer import TOKENIZER_FILE, HavocTokenizer

HF_INDEX_NAME = "model.safetensors.index.json"
HF_PYTORCH_NAME = "pytorch_model.bin"
GENERATION_CONFIG_NAME = "generation_config.json"

# HAVOC name -> HF name, per layer and for the rest of the model.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w3.weight": "mlp.down_proj.weight",
}
_MODEL_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def weight_names(config: HavocConfig) -> dict[str, str]:
    """HAVOC tensor name -> HF tensor name for every stored tensor of `config`'s model."""
    names = dict(_MODEL_NAMES)
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def hf_config_dict(config: HavocConfig, dtype: torch.dtype) -> dict:
    """A LlamaForCausalLM config.json for `config`, readable by old and current transformers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.attention.num_heads,
        "num_key_value_heads": config.attention.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        # Older releases read rope_theta; transformers >= 5 reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def havoc_config_from_hf(hf: dict, source: Path) -> HavocConfig:
    """The HavocConfig for a Llama config.json, or a ValueError saying why HAVOC cannot hold it."""

    def refuse(reason: str) -> ValueError:
        return ValueError(f"{source}: cannot convert: {reason}")

    model_type = hf.get("model_type")
    if model_type != "llama":
        raise refuse(f"model_type is {model_type!r}; only Llama-architecture checkpoints ('llama') are supported")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        layers, ffn, vocab = int(hf["num_hidden_layers"]), int(hf["intermediate_size"]), int(hf["vocab_size"])
    except KeyError as e:
        raise refuse(f"config.json lacks {e.args[0]!r}") from None
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise refuse(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}; HAVOC derives head_dim as d_model / heads")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise refuse(f"{flag} is true; HAVOC's projections have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act is {hf['hidden_act']!r}; HAVOC's SwiGLU uses silu")
    # rope_theta at the top level (older releases) or inside rope_parameters (transformers >= 5).
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        raise refuse(f"RoPE scaling {scaling or rope} is not supported; HAVOC implements plain RoPE")
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))

    def token_id(key: str, default: int, several: bool = False) -> int | list[int]:
        value = hf.get(key)
        if isinstance(value, list):  # several ids (Llama-3-Instruct's eos); HavocConfig keeps several for eos only
            value = [int(v) for v in value] if several and len(value) > 1 else (value[0] if value else None)
        return default if value is None else value if isinstance(value, list) else int(value)

    try:
        return HavocConfig(
            vocab_size=vocab, d_model=hidden, num_layers=layers,
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            attention=AttentionConfig(heads, kv_heads), mlp=MLPConfig(ffn),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            rope_theta=rope_theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # transformers' LlamaConfig defaults to untied embeddings.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            pad_token_id=token_id("pad_token_id", 0),
            bos_token_id=token_id("bos_token_id", 1),
            eos_token_id=token_id("eos_token_id", 2, several=True),
        )
    except ValueError as e:
        raise refuse(str(e)) from None


def havoc_to_hf(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write HAVOC checkpoint `src` as a directory that AutoModelForCausalLM loads as LlamaForCausalLM.

    The tokenizer (`tokenizer`, or the one beside `src`) and a generation_config.json go with it,
    so AutoTokenizer and `generate` work on the folder alone.
    """
    src = Path(src)
    config = HavocConfig.load(src / CONFIG_NAME)
    loaded = None
    if tokenizer is not None or (src / TOKENIZER_FILE).exists():
        loaded = HavocTokenizer.load(tokenizer if tokenizer is not None else src)
        check_vocab(config, loaded, src)
    state, weights_file = load_weights(src)
    names = weight_names(config)
    _check_names(state, set(names), weights_file, optional=set())
    hf_state = {theirs: state[ours].contiguous() for ours, theirs in names.items()}
    dtype = next(iter(hf_state.values())).dtype

    with atomic_directory(dst) as out:
        save_file(hf_state, out / SAFETENSORS_NAME, metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(hf_config_dict(config, dtype), indent=2) + "\n")
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "pad_token_id": config.pad_token_id}
        (out / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
        if loaded is not None:
            loaded.save(out)
    return Path(dst)


def hf_to_havoc(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Import a Llama-architecture HF checkpoint directory (single or sharded) as a HAVOC checkpoint."""
    src = Path(src)
    config_file = src / CONFIG_NAME
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file} does not exist; is {src} a Hugging Face checkpoint directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    config = havoc_config_from_hf(hf, config_file)
    state, weights_source = _load_hf_weights(src)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old buffers
    names = weight_names(config)
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise ValueError(f"{weights_source}: tie_word_embeddings is false but there is no lm_head.weight")
    # A checkpoint saved tied may still carry a copy of lm_head.weight; the tie makes it redundant.
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    _check_names(state, set(names.values()), weights_source, optional=optional)
    ours = {havoc: state[hf_name].contiguous() for havoc, hf_name in names.items()}

    with atomic_directory(dst) as out:
        save_file(ours, out / SAFETENSORS_NAME, metadata={"format": "pt"})
        config.save(out / CONFIG_NAME)
    return Path(dst)


def _load_hf_weights(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    index = src / HF_INDEX_NAME
    if index.exists():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e!r})") from None
        state = {}
        for shard_name in shard_names:
            shard = src / shard_name
            if not shard.exists():
                raise FileNotFoundError(f"{index} lists shard {shard_name}, which is missing from {src}")
            try:
                state.update(load_file(shard))
            except SafetensorError as e:
                raise ValueError(f"{shard} cannot be read ({e}); it is truncated or corrupted") from None
        return state, index
    if (src / SAFETENSORS_NAME).exists() or (src / HF_PYTORCH_NAME).exists():
        return load_weights(src)
    raise FileNotFoundError(f"{src} has no {SAFETENSORS_NAME}, {HF_INDEX_NAME} or {HF_PYTORCH_NAME}")


def _check_names(state: dict, expected: set[str], source: Path, optional: set[str]) -> None:
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected - optional)
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match the config: missing {missing[:8] or 'none'}, "
            f"unexpected {unexpected[:8] or 'none'} (biases or other extra tensors cannot be converted)"
        )
