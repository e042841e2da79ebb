"""The work of `prepare`'s worker processes: texts in, each document's split and token array out.

It imports no torch, so a worker starts in a fraction of a second. Each worker tokenizes on one
core (the pool is the parallelism: `tokenizers`' own threads would compete with it).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from tokenizers import Tokenizer

from havoc_core.tokenizer import HavocTokenizer
from havoc_core.tokenizer.corpus import in_val_split
from havoc_core.tokenizer.tokenizer import pieces

_tokenizer: HavocTokenizer | None = None


def start(tokenizer_json: str) -> None:
    """The pool's initializer: this worker's tokenizer, single-threaded, and a watch on its parent."""
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = HavocTokenizer(Tokenizer.from_str(tokenizer_json))
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
    # A forked worker holds its own copy of the task pipe, so it never reads end-of-file when the
    # parent is killed (SIGKILL, the OOM killer): without this it would wait forever, an orphan.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def encode(texts: list[str], val_fraction: float) -> list[tuple[bool, np.ndarray, int]]:
    """For each text: whether it is a validation document, <|bos|> ids <|eos|> as uint32, its UTF-8 bytes.

    A long text goes piece by piece (the same ids, see `pieces`), each piece's ids to uint32 at
    once: a 16 MB document then never holds all its `tokenizers` encodings and Python ints at once."""
    bos, eos = (np.array([t], dtype=np.uint32) for t in (_tokenizer.bos_token_id, _tokenizer.eos_token_id))
    return [(in_val_split(text, val_fraction),
             np.concatenate([bos, *(np.array(_tokenizer.encode(piece), dtype=np.uint32) for piece in pieces(text)), eos]),
             len(text.encode("utf-8")))
            for text in texts]
