"""Supervised fine-tuning data: chat JSONL -> batches whose loss covers assistant tokens only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from havoc_core.model.transformer import IGNORE_INDEX
from havoc_core.tokenizer import HavocTokenizer
from havoc_core.tokenizer.corpus import in_val_split, jsonl_records
from havoc_training.data import SPLITS, EpochBatches


def read_chats(path: str | os.PathLike) -> list[tuple[str, list[dict]]]:
    """(source, messages) per line of a chat JSONL file: {"messages": [{"role": ..., "content": ...}, ...]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat file {path} does not exist (fine-tuning takes a .jsonl of {{'messages': [...]}})")
    chats = []
    for number, record in jsonl_records(path, path.read_text(encoding="utf-8").splitlines()):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ValueError(f"{path}:{number} needs a 'messages' list")
        chats.append((f"{path.name}:{number}", record["messages"]))
    if not chats:
        raise ValueError(f"chat file {path} holds no conversations")
    return chats


class ChatLoader(EpochBatches):
    """Conversations as (inputs, targets): right-padded to the longest in the batch, targets -100
    except on assistant contents and their <|end|>. Causal attention never looks right, so the
    right padding needs no mask. A conversation longer than seq_len + 1 tokens is cut there; one
    with no assistant token left is not used. `report` says how many of each."""

    def __init__(self, path: str | os.PathLike, tokenizer: HavocTokenizer, seq_len: int, batch_size: int,
                 split: str = "train", val_fraction: float = 0.05, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, accumulation: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.seq_len, self.pad_id = split, seq_len, tokenizer.pad_token_id
        self.examples = []
        conversations = no_reply = cut_away = cut = 0
        for source, messages in read_chats(path):
            try:  # every conversation is checked, whichever split it belongs to
                ids, learn = tokenizer.encode_chat(messages)
            except ValueError as e:
                raise ValueError(f"{Path(path).parent / source}: {e}") from None
            if in_val_split(json.dumps(messages, sort_keys=True), val_fraction) != (split == "val"):
                continue
            conversations += 1
            if not any(learn):  # nothing to learn from a chat without assistant text
                no_reply += 1
                continue
            if len(ids) > seq_len + 1:
                ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
                if not any(learn[1:]):
                    cut_away += 1
                    continue
                cut += 1
            targets = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], learn[1:])]
            self.examples.append((ids[:-1], targets))
        self.report = ", ".join(f"{count} {why}" for count, why in (
            (no_reply, "had no assistant message and were left out"),
            (cut_away, f"had no assistant token within seq_len + 1 = {seq_len + 1} tokens and were left out"),
            (cut, f"were cut to seq_len + 1 = {seq_len + 1} tokens (raise seq_len to keep them whole)")) if count)
        if self.report:
            self.report = f"{path}: of {conversations} {split} conversations, {self.report}"
        self._setup_order(len(self.examples), batch_size, seed, rank, world_size, shuffle, accumulation)
        if self.batches_per_epoch == 0 and split == "train":
            raise ValueError(f"{path}: the {split} split has {len(self.examples)} usable conversations, too few for "
                             f"one step of {self.global_batch} (global_batch_tokens / seq_len)")

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in indices]
        width = max(len(inputs) for inputs, _ in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, labels) in enumerate(rows):
            inputs[row, : len(ids)] = torch.tensor(ids)
            targets[row, : len(labels)] = torch.tensor(labels)
        return inputs, targets

    def _identity(self) -> dict:
        return {**super()._identity(), "split": self.split, "seq_len": self.seq_len}
