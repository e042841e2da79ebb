"""HavocTokenizer: byte-level BPE on Hugging Face `tokenizers`, with HAVOC's special tokens and chat format.

Byte-level BPE maps every UTF-8 byte to a symbol before merging, so any text round-trips exactly.
Special tokens have fixed ids matching HavocConfig's defaults (pad 0, bos 1, eos 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from havoc_core.tokenizer.corpus import Corpus

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES), END]  # ids 0..6, in this order
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Documents reach `tokenizers` in pieces of about this many characters: a 50 MB one-line document
# given whole took ~100 bytes of memory per byte, ten times what the same text took as 50 files.
PIECE_CHARS = 1 << 20
# Where a piece may end: just before a space between two non-spaces. The byte-level pre-tokenizer
# (GPT-2's pattern, no look-behind) starts a pre-token at such a space whatever precedes it, and only
# a space can begin the pre-token after it, so the cut changes no pre-token and so no id.
_CUT = re.compile(r"\S(?= \S)")


def pieces(text: str, size: int | None = None) -> list[str]:
    """`text` in pieces of about `size` characters, cut where it gives exactly the same tokens.
    A stretch with no such place (no spaces at all) stays whole."""
    size = size or PIECE_CHARS
    out, start = [], 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size - 1)
        if cut is None:
            break
        out.append(text[start : cut.end()])
        start = cut.end()
    out.append(text[start:])
    return out


# The same format as apply_chat_template, in Jinja for transformers' AutoTokenizer:
# <|bos|> then <|role|>content<|end|> per message, then <|assistant|> to prompt a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class HavocTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ValueError(
                    f"not a HAVOC tokenizer: {token} has id {tokenizer.token_to_id(token)}, expected {expected_id}"
                )
        self._with_specials = tokenizer
        # A twin that reads special-token text as plain text, so users cannot forge roles.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True

    # Training.
    @classmethod
    def train(
        cls,
        source: Corpus | Iterable[str],
        vocab_size: int = 70000,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> HavocTokenizer:
        """Train on a `Corpus` (files, folders, JSONL) or any iterable of strings."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        texts = (doc.text for doc in source) if isinstance(source, Corpus) else iter(source)
        seen = 0

        def counted() -> Iterator[str]:
            nonlocal seen
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"training texts must be str, got {type(text).__name__}")
                if text:
                    seen += 1
                    yield from pieces(text)  # the same merges as the whole text, in bounded memory

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator(counted(), trainer=trainer)
        if seen == 0:
            raise ValueError("the training corpus is empty: no non-empty text was found")
        return cls(tokenizer)

    # Files.
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, which transformers' AutoTokenizer loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": PAD,
            "bos_token": BOS,
            "eos_token": EOS,
            "additional_special_tokens": SPECIAL_TOKENS[3:],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,  # transformers' default would alter decoded text
            "model_max_length": 1_000_000_000,
        }
        for name, text in (
            (TOKENIZER_FILE, self._with_specials.to_str(pretty=True)),
            (TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n"),
        ):
            tmp = directory / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, directory / name)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HavocTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; train one with `havoc tokenizer train`")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid tokenizer file ({e}); train or save it again") from None
        try:
            return cls(tokenizer)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # Encoding and decoding.
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with no bos/eos. Special-token text stays plain unless `allow_special`."""
        if len(text) <= PIECE_CHARS:
            return self._encoder(allow_special).encode(text, add_special_tokens=False).ids
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads; long texts go in pieces (same ids, bounded memory)."""
        split = [pieces(text) for text in texts]
        flat = [piece for parts in split for piece in parts]
        encodings = self._encoder(allow_special).encode_batch_fast(flat, add_special_tokens=False)
        ids, at = [], 0
        for parts in split:
            ids.append([i for e in encodings[at : at + len(parts)] for i in e.ids])
            at += len(parts)
        return ids

    def _encoder(self, allow_special: bool) -> Tokenizer:
        return self._with_specials if allow_special else self._plain

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self._check_ids(ids)
        return self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        for ids in batch:
            self._check_ids(ids)
        return self._plain.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int]) -> None:
        vocab = self.vocab_size
        for i in ids:
            if not 0 <= i < vocab:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab})")

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression on `texts`: UTF-8 bytes per token (higher is better)."""
        texts = list(texts)
        tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return sum(len(t.encode("utf-8")) for t in texts) / max(tokens, 1)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of a chat: <|bos|>, then <|role|> content <|end|> per message, then <|assistant|> if asked.

        Role markers come from the special ids; contents are encoded as plain text.
        """
        ids, _ = self.encode_chat(messages)
        return ids + [self.token_id("<|assistant|>")] if add_generation_prompt else ids

    def encode_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """`apply_chat_template` ids and, per id, whether a fine-tuned model should learn to produce it:
        the contents of assistant messages and their closing <|end|> (so the model learns to stop)."""
        ids, learn = [self.bos_token_id], [False]
        for role, content in _check_messages(messages):
            body = [*self.encode(content), self.end_token_id]
            ids += [self.token_id(f"<|{role}|>"), *body]
            learn += [False] + [role == "assistant"] * len(body)
        return ids, learn

    # Vocabulary.
    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for special tokens), for bits-per-byte.

        Byte-level BPE writes each byte as one symbol, so a token's length in symbols is its length in bytes.
        """
        vocab = self._plain.get_vocab(with_added_tokens=False)
        lengths = [0] * self.vocab_size
        for token, token_id in vocab.items():
            if token_id >= len(SPECIAL_TOKENS):
                lengths[token_id] = len(token)
        return lengths

    def token_id(self, token: str) -> int:
        token_id = self._plain.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return token_id

    pad_token_id = property(lambda self: SPECIAL_TOKENS.index(PAD))
    bos_token_id = property(lambda self: SPECIAL_TOKENS.index(BOS))
    eos_token_id = property(lambda self: SPECIAL_TOKENS.index(EOS))
    end_token_id = property(lambda self: SPECIAL_TOKENS.index(END))

    def to_str(self) -> str:
        """The tokenizer as Hugging Face `tokenizers` JSON (what tokenizer.json holds)."""
        return self._with_specials.to_str()

    @property
    def sha256(self) -> str:
        """A fingerprint of the vocabulary and merges: data prepared with another tokenizer differs."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()


def _check_messages(messages: Sequence[dict]) -> Iterator[tuple[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role in {ROLES}, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs string content")
        yield message["role"], message["content"]
