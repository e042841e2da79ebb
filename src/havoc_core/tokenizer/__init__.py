"""The HAVOC tokenizer (byte-level BPE) and the corpus reader that feeds it and the data pipeline."""

from havoc_core.tokenizer.corpus import Corpus, Document, stdlib_corpus
from havoc_core.tokenizer.tokenizer import SPECIAL_TOKENS, HavocTokenizer

__all__ = ["Corpus", "Document", "HavocTokenizer", "SPECIAL_TOKENS", "stdlib_corpus"]
