"""Reading text corpora: files, folders (recursive, glob filters), JSONL, and the embedded default.

A document is a whole text file or one JSONL record's text field. The embedded default corpus is
the Python standard library's own source, present on every machine that runs HAVOC.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Test suites are left out of the default corpus: they hold deliberately odd encodings and data.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_corpus() -> list[Path]:
    """The embedded default corpus: the standard library's .py files (~12 MB), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"found no Python sources under {root} for the default corpus; pass your own paths")
    return sorted(files)


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether a document is held out, by a hash of its text: stable across runs, orders and
    machines, and identical documents always fall on the same side (no train/val leakage)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def jsonl_records(path: Path, text: str, torn_end: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSONL file; a line that is not JSON is named.
    `torn_end`: the file is an append log, which a kill can leave with a torn last line: that line
    is dropped with a warning."""
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            if torn_end and number == len(lines):
                print(f"warning: {path}:{number} is a torn last record (a run was killed while writing it); "
                      "dropped", file=sys.stderr)
                return
            raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None


@dataclass
class Document:
    text: str
    source: str  # where it came from, relative to the inputs' common folder ("json/decoder.py", "d.jsonl:12")


@dataclass
class Corpus:
    """Documents from `paths`; folders are searched recursively for files matching `include`."""

    paths: Sequence[str | os.PathLike]
    include: Sequence[str] = ("*",)
    text_field: str = "text"
    skipped: list[str] = field(default_factory=list)  # files that were not UTF-8 text

    def files(self) -> list[Path]:
        if not self.paths:
            raise ValueError("no input paths given")
        found: list[Path] = []
        for raw in self.paths:
            path = Path(raw)
            if path.is_dir():
                matches = sorted(
                    p for p in path.rglob("*")
                    if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                    and any(fnmatch.fnmatch(p.name, pattern) for pattern in self.include)
                )
                if not matches:
                    raise FileNotFoundError(f"folder {path} has no files matching {', '.join(self.include)}")
                found.extend(matches)
            elif path.is_file():
                found.append(path)
            else:
                raise FileNotFoundError(f"input {path} does not exist")
        return found

    def __iter__(self) -> Iterator[Document]:
        files = self.files()
        root = Path(os.path.commonpath([p.resolve() for p in files]))
        if root.is_file():
            root = root.parent
        for path in files:
            yield from self._read(path, str(path.resolve().relative_to(root)))

    def _read(self, path: Path, source: str) -> Iterator[Document]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read input file {path}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped.append(str(path))  # binary or another encoding: not text we can train on
            return
        if path.suffix != ".jsonl":
            if text:
                yield Document(text, source)
            return
        for number, record in jsonl_records(path, text):
            value = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number} has no string field {self.text_field!r} (set --text-field)")
            if value:
                yield Document(value, f"{source}:{number}")
