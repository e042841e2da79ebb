"""HavocModel: the HAVOC decoder-only transformer, with loss, generation and save/load."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from havoc_core import quantize as _quantize
from havoc_core.config import HavocConfig
from havoc_core.model.blocks import KVCache, RMSNorm, RotaryEmbedding, TransformerBlock

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
IGNORE_INDEX = -100

_CONFIG_EOS = object()  # generate()'s default: the config's eos_token_id


class CausalLMOutput(NamedTuple):
    """Unpacks as `logits, past_kv = model(ids, use_cache=True)`; `model(ids).logits` also works."""

    logits: torch.Tensor
    past_kv: list[KVCache] | None = None


class HavocModel(nn.Module):
    def __init__(self, config: HavocConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: HavocConfig) -> HavocModel:
        return cls(config)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> HavocModel:
        """nn.Module.to_empty, keeping a tied LM head tied (it gives each module a new Parameter)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def parameter_inits(self) -> list[tuple[str, nn.Parameter, Callable[[torch.Tensor], None]]]:
        """Each parameter (a tied matrix once) with its in-place init, in the order reset_parameters
        draws them: GPT-NeoX style, weights ~ N(0, initializer_range), norms 1, the pad row 0.

        A sharded trainer runs the same inits on full-size tensors in the same order and keeps its
        shard of each, so the weights equal one-process init for the same seed."""
        std, pad = self.config.initializer_range, self.config.pad_token_id

        def normal(t: torch.Tensor) -> None:
            t.normal_(0.0, std)

        def embedding(t: torch.Tensor) -> None:
            t.normal_(0.0, std)
            t[pad].zero_()

        def ones(t: torch.Tensor) -> None:
            t.fill_(1.0)

        inits = []
        for name, param in self.named_parameters():
            module = self.get_submodule(name.rpartition(".")[0])
            if param is self.embed_tokens.weight:
                inits.append((name, param, embedding))
            elif isinstance(module, RMSNorm):
                inits.append((name, param, ones))
            elif isinstance(module, nn.Linear):
                inits.append((name, param, normal))
            else:
                raise TypeError(f"no init is defined for parameter {name}")
        return inits

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter (see parameter_inits) and rebuild the RoPE tables where the
        weights are: after `to_empty`, this is what makes a meta-built model real."""
        for _, param, init in self.parameter_inits():
            init(param)
        self.rotary.reset_tables(self.embed_tokens.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once

    # Forward.
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_kv: list[KVCache] | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits [batch, seq, vocab] for `input_ids` [batch, seq].

        `attention_mask` (1 = token, 0 = padding) covers the cached tokens and the new ones,
        [batch, past + seq]. Positions count each row's real tokens, so a left-padded row gives
        the same logits as that row alone. `logits_to_keep` > 0 computes the logits of the last
        that many positions only (generation needs one; the LM head is the widest matrix).
        """
        x, new_kv = self._decode(input_ids, attention_mask, past_kv)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return CausalLMOutput(logits, new_kv if use_cache else None)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states [batch, seq, d_model] that the LM head turns into logits."""
        return self._decode(input_ids, attention_mask, None)[0]

    def _decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_kv: list[KVCache] | None
    ) -> tuple[torch.Tensor, list[KVCache]]:
        batch, seq = self._check_input_ids(input_ids)
        past_len = past_kv[0][0].shape[2] if past_kv else 0
        if past_kv is not None and len(past_kv) != len(self.layers):
            raise ValueError(f"past_kv has {len(past_kv)} layers, the model has {len(self.layers)}")
        total = past_len + seq
        if total > self.config.max_seq_len:
            raise ValueError(
                f"input of {seq} tokens after {past_len} cached ones is {total} tokens, "
                f"more than max_seq_len={self.config.max_seq_len}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"[batch, past + seq] = {(batch, total)}"
            )
        if attention_mask is None:
            positions = torch.arange(past_len, total, device=input_ids.device).expand(batch, seq)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        # Plain causal attention (no mask tensor) takes SDPA's fastest path.
        needs_mask = attention_mask is not None or (past_len > 0 and seq > 1)
        mask = self._allowed(batch, seq, past_len, attention_mask, input_ids.device) if needs_mask else None

        rope = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, mask, past_kv[i] if past_kv else None)
            new_kv.append(kv)
        return self.norm(x), new_kv

    def _check_input_ids(self, input_ids: torch.Tensor) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, seq] with seq >= 1, got {tuple(input_ids.shape)}")
        # Checked before the embedding lookup: on a GPU an out-of-range id is a device-side
        # assert that kills the process. Skipped inside torch.compile (the engine checks first).
        if not torch.compiler.is_compiling():
            vocab = self.config.vocab_size
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
            if bad.numel():
                raise ValueError(f"token id {bad[0].item()} is outside the vocabulary [0, {vocab})")
        return input_ids.shape[0], input_ids.shape[1]

    @staticmethod
    def _allowed(
        batch: int, seq: int, past_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Boolean [batch, 1, seq, past+seq]: query i may attend key j (causal, padding hidden)."""
        q_pos = torch.arange(past_len, past_len + seq, device=device)[:, None]
        k_pos = torch.arange(past_len + seq, device=device)[None, :]
        allowed = (k_pos <= q_pos).expand(batch, seq, past_len + seq)
        if attention_mask is not None:
            # A padding query would see no key at all (NaN in softmax, which then leaks through
            # 0 * NaN); letting every query see itself keeps padding rows finite and harmless.
            allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)
        return allowed[:, None]

    def build_attention_mask(
        self, input_ids: torch.Tensor, past_length: int = 0, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Additive mask [batch, 1, seq_len, past_length + seq_len]: 0 where allowed, -inf where masked."""
        batch, seq = input_ids.shape
        allowed = self._allowed(batch, seq, past_length, attention_mask, input_ids.device)
        return torch.zeros(allowed.shape, device=input_ids.device).masked_fill(~allowed, float("-inf"))

    # Training.
    def compute_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy and the logits.

        Token t predicts label t+1. Labels default to `input_ids`; labels equal to -100 and
        positions where `attention_mask` is 0 are ignored. Masking goes by position, never by
        token id: many configs share one id between pad and eos, and eos must still be learnt.
        With no label left the loss is 0 (not NaN), so a fully masked micro-batch cannot poison training.
        """
        logits = self(input_ids, attention_mask=attention_mask).logits
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
        ignore = labels == IGNORE_INDEX
        if attention_mask is not None:
            ignore |= attention_mask == 0
        targets = labels.masked_fill(ignore, IGNORE_INDEX)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll / (targets != IGNORE_INDEX).sum().clamp(min=1), logits

    # Generation.
    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: torch.Tensor | list[list[int]],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = _CONFIG_EOS,  # type: ignore[assignment]
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Autoregressive generation with the KV cache; returns prompt + new tokens [batch, <= S + n].

        `prompt_ids` is a [batch, seq] tensor (left-padded, with `attention_mask`) or a list of
        id lists of any lengths, which are left-padded here. temperature 0 is greedy. A row stops
        at an EOS id, any of the config's by default (later positions hold pad_token_id);
        `eos_token_id=None` generates exactly `max_new_tokens`. `seed` makes sampling reproducible.
        """
        if eos_token_id is _CONFIG_EOS:
            eos_token_id = self.config.eos_token_ids
        device = self.embed_tokens.weight.device
        if isinstance(prompt_ids, (list, tuple)):
            prompt_ids, attention_mask = self._left_pad(prompt_ids, device)
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        batch, prompt_len = self._check_input_ids(prompt_ids)
        if prompt_len + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if max_new_tokens == 0:
            return prompt_ids
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the plain causal path
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        stop_ids = None if eos_token_id is None else torch.tensor(eos_token_id, device=device).reshape(-1)
        logits, past_kv = self(prompt_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_k, top_p, generator)
            token = token.masked_fill(finished, self.config.pad_token_id)
            new_tokens.append(token)
            if stop_ids is not None:
                finished |= torch.isin(token, stop_ids)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=1)
            logits, past_kv = self(token[:, None], attention_mask=attention_mask, past_kv=past_kv, use_cache=True)
        return torch.cat((prompt_ids, torch.stack(new_tokens, dim=1)), dim=1)

    def _left_pad(self, prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(device), mask.to(device)

    # Save and load.
    def save_pretrained(self, save_directory: str | os.PathLike, use_safetensors: bool = True) -> None:
        """Write config.json and model.safetensors (or pytorch_model.bin); a tied matrix is stored once.
        A model with torchao-quantized weights (havoc_core.quantize) is written as safetensors with
        torchao's metadata, plus quantization.json.

        Each file is written beside its final name and renamed into place, so an interrupted save
        never leaves a truncated file under the real name.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = self.lm_head.weight is self.embed_tokens.weight
        state = {name: tensor.detach() for name, tensor in self.state_dict().items()
                 if not (tied and name == "lm_head.weight")}
        metadata, recorded = {"format": "pt"}, _quantize.describe(self)
        if recorded is not None:
            if not use_safetensors:
                raise ValueError("a quantized model is saved as safetensors only")
            state, torchao_metadata = _quantize.flatten(state)
            metadata.update(torchao_metadata)
        state = {name: tensor.contiguous() for name, tensor in state.items()}
        quantization = directory / _quantize.QUANTIZATION_NAME
        if recorded is not None:
            _write_into_place(quantization, lambda tmp: tmp.write_text(json.dumps(recorded, indent=2) + "\n"))
        else:
            quantization.unlink(missing_ok=True)
        if use_safetensors:
            _write_into_place(directory / SAFETENSORS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
        else:
            _write_into_place(directory / PYTORCH_NAME, lambda tmp: torch.save(state, tmp))
        _write_into_place(directory / CONFIG_NAME, self.config.save)

    @classmethod
    def load_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
    ) -> HavocModel:
        """Load a `save_pretrained` directory; the model comes back in eval mode, as in transformers.

        `dtype` (a torch.dtype or its name) defaults to bfloat16 on CUDA and float32 on the CPU,
        whatever dtype the file holds. `quantize` ("int8" or "int4") quantizes the linear weights
        with torchao after loading (compute in bfloat16); a folder `havoc quantize` wrote loads
        quantized as it is."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu'")
        recorded = _quantize.quantization_of(directory)
        scheme = quantize or (recorded or {}).get("scheme")
        dtype = resolve_dtype(dtype, device, scheme)
        _quantize.check_scheme(scheme, dtype)
        if recorded is not None:
            return cls._load_quantized(directory, device, recorded, quantize)
        config = HavocConfig.load(directory / CONFIG_NAME)
        state, weights_file = load_weights(directory, device)
        with torch.device("meta"):
            model = cls(config)
        if config.tie_word_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        check_state_dict(model, state, weights_file)
        model.load_state_dict(state, assign=True)
        model.tie_weights()  # assign=True gave the two names separate Parameters
        model.rotary.reset_tables(device)
        model = model.to(device=device, dtype=dtype).eval()
        if scheme is not None:
            _quantize.quantize(model, scheme)
        return model

    @classmethod
    def _load_quantized(cls, directory: Path, device: str | torch.device, recorded: dict,
                        asked: str | None) -> HavocModel:
        if asked not in (None, recorded["scheme"]):
            raise ValueError(f"{directory} holds {recorded['scheme']} weights; it cannot be loaded as {asked}: "
                             "quantize the unquantized folder instead")
        if recorded["scheme"] == "int4" and recorded["device"] != torch.device(device).type:
            raise ValueError(f"{directory} holds int4 weights packed for {recorded['device']}'s kernel, not "
                             f"{torch.device(device).type}'s: run `havoc quantize` again with --device "
                             f"{torch.device(device).type}, or load the unquantized folder with --quantize int4")
        weights_file = directory / SAFETENSORS_NAME
        state = _quantize.unflatten(*_read_safetensors(weights_file, device), weights_file)
        config = HavocConfig.load(directory / CONFIG_NAME)
        with torch.device("meta"):
            model = cls(config)
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))  # quantized on its own
        check_state_dict(model, state, weights_file)
        model.load_state_dict(state, assign=True)
        model.rotary.reset_tables(device)
        return model.eval()


SigmaModel = HavocModel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device,
                  quantize: str | None = None) -> torch.dtype:
    """A dtype or its name ("bfloat16", "float16", "float32"); None or "auto" is bfloat16 on CUDA
    (tensor cores, half the memory of fp32) and float32 on the CPU, and bfloat16 for quantized
    weights (`quantize` a scheme) wherever they run."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if quantize or torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    return dtype


def load_weights(directory: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], Path]:
    """The plain tensors of a checkpoint directory: safetensors first, else a weights-only torch file."""
    if (directory / _quantize.QUANTIZATION_NAME).exists():
        raise ValueError(f"{directory} holds torchao-quantized weights, which only HavocModel.load_pretrained "
                         "reads: convert or export the unquantized folder it was made from")
    safetensors_file, pytorch_file = directory / SAFETENSORS_NAME, directory / PYTORCH_NAME
    if safetensors_file.exists():
        return _read_safetensors(safetensors_file, device)[0], safetensors_file
    if pytorch_file.exists():
        try:
            state = torch.load(pytorch_file, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing {pytorch_file}: it holds Python objects, not only tensors, and is not "
                f"loaded (weights_only=True). Convert it to safetensors from a trusted source. ({e})"
            ) from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{pytorch_file} cannot be read ({e}); it is truncated or corrupted") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pytorch_file} does not hold a dict of tensors")
        return state, pytorch_file
    raise FileNotFoundError(f"{directory} has no {SAFETENSORS_NAME} or {PYTORCH_NAME}")


def _read_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its metadata."""
    try:
        with safe_open(path, "pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}); it is truncated or corrupted: save it again") from None


def _write_into_place(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary sibling of `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise a ValueError naming every tensor of `state` that does not fit `model`."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for name in sorted(set(expected) & set(state)):
        if tuple(state[name].shape) != expected[name]:
            problems.append(f"{name} has shape {tuple(state[name].shape)} but config.json implies {expected[name]}")
    if problems:
        raise ValueError(f"{source} does not match its config.json: " + "; ".join(problems))


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def filter_logits(logits: torch.Tensor, top_k: int | list[int] = 0, top_p: float | list[float] = 1.0,
                  min_p: float | list[float] = 0.0) -> torch.Tensor:
    """Set to -inf the logits [..., vocab] outside the top k, the top-p nucleus and the min-p floor
    (0/1/0: off). Each is one value for all rows or a list of one per row (of logits [rows, vocab])."""
    shape, vocab = logits.shape, logits.shape[-1]
    logits = logits.reshape(-1, vocab)
    ks, ps, mins = (v if isinstance(v, list) else [v] for v in (top_k, top_p, min_p))
    # Each stage runs only if some row uses it; a row that does not is left as it is.
    if any(0 < k < vocab for k in ks):
        values = torch.topk(logits, max(k for k in ks if k < vocab), dim=-1).values
        index = torch.tensor([[k - 1 if 0 < k < vocab else 0] for k in ks], device=logits.device)
        kth = values.gather(-1, index.expand(*values.shape[:-1], 1))
        off = torch.tensor([[not 0 < k < vocab] for k in ks], device=logits.device)
        logits = logits.masked_fill((logits < kth) & ~off, float("-inf"))
    if any(p < 1 for p in ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        p = torch.tensor([[p] for p in ps], device=logits.device, dtype=probs.dtype)
        drop = (probs.cumsum(dim=-1) - probs >= p) & (p < 1)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(m > 0 for m in mins):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor([[m] for m in mins], device=logits.device, dtype=probs.dtype)
        logits = logits.masked_fill(probs < floor * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits.view(shape)
