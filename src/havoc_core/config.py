"""HavocConfig: every shape and constant of a HAVOC model, with presets and JSON round trip.

Validation runs in ``__post_init__``, so it also runs on ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AttentionConfig:
    num_heads: int = 32
    num_kv_heads: int = 8


@dataclass
class MLPConfig:
    hidden_dim: int = 11008


@dataclass
class HavocConfig:
    vocab_size: int = 70000
    d_model: int = 4096
    num_layers: int = 32
    max_seq_len: int = 4096
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    dropout: float = 0.0
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2  # several ids as in HF configs (e.g. Llama-3-Instruct); any one ends a reply

    def __post_init__(self) -> None:
        # Nested sections given as plain dicts (from JSON or by hand) become their dataclasses.
        if isinstance(self.attention, dict):
            self.attention = _from_section(AttentionConfig, self.attention, "attention")
        if isinstance(self.mlp, dict):
            self.mlp = _from_section(MLPConfig, self.mlp, "mlp")
        problems = self._problems()
        if problems:
            raise ValueError("invalid HavocConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        sizes = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "num_layers": self.num_layers,
            "max_seq_len": self.max_seq_len,
            "attention.num_heads": self.attention.num_heads,
            "attention.num_kv_heads": self.attention.num_kv_heads,
            "mlp.hidden_dim": self.mlp.hidden_dim,
        }
        problems = [
            f"{name} must be a positive integer, got {value!r}"
            for name, value in sizes.items()
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ]
        if problems:
            return problems
        heads, kv_heads = self.attention.num_heads, self.attention.num_kv_heads
        if self.d_model % heads:
            problems.append(f"attention.num_heads ({heads}) must divide d_model ({self.d_model})")
        elif (self.d_model // heads) % 2:
            problems.append(
                f"head_dim = d_model / attention.num_heads = {self.d_model // heads} must be even for RoPE"
            )
        if heads % kv_heads:
            problems.append(
                f"attention.num_kv_heads ({kv_heads}) must divide attention.num_heads ({heads})"
            )
        ids = {"pad_token_id": [self.pad_token_id], "bos_token_id": [self.bos_token_id],
               "eos_token_id": self.eos_token_ids}
        for name, values in ids.items():
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size
                                 for v in values):
                problems.append(f"{name} ({getattr(self, name)!r}) must be an id (or, for eos_token_id, a non-empty "
                                f"list of ids) in [0, vocab_size={self.vocab_size})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout ({self.dropout}) must be in [0, 1)")
        for name in ("initializer_range", "rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        return problems

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a sequence."""
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.num_heads

    # Presets. All have dropout 0.0.
    @classmethod
    def havoc_7b(cls) -> HavocConfig:
        """The specification's shape: 5,957,685,248 parameters (see README)."""
        return cls()

    @classmethod
    def havoc_1b(cls) -> HavocConfig:
        return cls(d_model=2048, num_layers=16, attention=AttentionConfig(16, 4), mlp=MLPConfig(5504))

    @classmethod
    def havoc_small(cls) -> HavocConfig:
        return cls(
            vocab_size=8192, d_model=512, num_layers=8, max_seq_len=1024,
            attention=AttentionConfig(8, 2), mlp=MLPConfig(1376),
        )

    @classmethod
    def havoc_tiny(cls) -> HavocConfig:
        return cls(
            vocab_size=256, d_model=64, num_layers=2, max_seq_len=256,
            attention=AttentionConfig(4, 2), mlp=MLPConfig(176),
        )

    @classmethod
    def preset(cls, name: str) -> HavocConfig:
        """A preset by name: '7b', '1b', 'small' or 'tiny' (with or without the 'havoc_' prefix)."""
        key = name.removeprefix("havoc_").lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return getattr(cls, f"havoc_{key}")()

    # JSON round trip.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HavocConfig:
        return _from_section(cls, data, "HavocConfig")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HavocConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config file {path}: {e}") from None


PRESETS = ("7b", "1b", "small", "tiny")


def _from_section(kind: type, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {where} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return kind(**data)
