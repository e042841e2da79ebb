"""Reading text corpora: files, folders (recursive, glob filters), JSONL (plain, .gz, .zst),
Parquet, Hugging Face `datasets` folders (`save_to_disk`), and the embedded default.

A document is a whole text file, or one record's text field (a JSONL line, a Parquet or datasets
row). Records are streamed, so memory stays bounded whatever the size of a file. The embedded
default corpus is the Python standard library's own source, present on every machine that runs HAVOC.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
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


def jsonl_records(path: Path, lines: Iterable[str], torn_end: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of JSONL `lines`; a line that is not JSON is named.
    `torn_end`: the file is an append log, which a kill can leave with a torn last line: that line
    is dropped with a warning."""
    lines = iter(lines)
    number, line = 1, next(lines, None)
    while line is not None:
        following = next(lines, None)  # one line ahead: is this the last?
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                if torn_end and following is None:
                    print(f"warning: {path}:{number} is a torn last record (a run was killed while writing it); "
                          "dropped", file=sys.stderr)
                    return
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None
        number, line = number + 1, following


# Compressed inputs, by their last suffix: pyarrow's codecs, decompressed as a stream.
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}


def is_dataset_folder(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


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
            if path.is_dir() and is_dataset_folder(path):
                found.append(path)
            elif path.is_dir():
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
        if root.is_file() or is_dataset_folder(root):  # one input: named by its own name
            root = root.parent
        for path in files:
            yield from self._read(path, str(path.resolve().relative_to(root)))

    def _read(self, path: Path, source: str) -> Iterator[Document]:
        if path.is_dir():
            yield from self._rows(path, source, _dataset_batches(path, self.text_field))
        elif path.suffix == ".parquet":
            yield from self._rows(path, source, _parquet_batches(path, self.text_field))
        elif (path.with_suffix("") if path.suffix in COMPRESSION else path).suffix == ".jsonl":
            yield from self._jsonl(path, source)
        else:
            data = _read_all(path)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped.append(str(path))  # binary or another encoding: not text we can train on
                return
            if text:
                yield Document(text, source)

    def _jsonl(self, path: Path, source: str) -> Iterator[Document]:
        with _lines(path) as lines:
            for number, record in jsonl_records(path, lines):
                value = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{number} has no string field {self.text_field!r} (set --text-field)")
                if value:
                    yield Document(value, f"{source}:{number}")

    def _rows(self, path: Path, source: str, batches: Iterator[list]) -> Iterator[Document]:
        row = 0
        for texts in batches:
            for text in texts:
                row += 1
                if not isinstance(text, str):
                    raise ValueError(f"{path} row {row}: field {self.text_field!r} is {text!r}, not text")
                if text:
                    yield Document(text, f"{source}:{row}")


def _opened(path: Path):
    """A binary stream of `path`, decompressed if its suffix says so; errors name the file."""
    import pyarrow as pa

    try:
        return pa.input_stream(str(path), compression=COMPRESSION.get(path.suffix))
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"cannot read input file {path}: {e}") from None


def _read_all(path: Path) -> bytes:
    if path.suffix not in COMPRESSION:
        try:
            return path.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read input file {path}: {e.strerror or e}") from None
    import pyarrow as pa

    with _opened(path) as stream:
        try:
            return stream.read()
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path} is not a readable {COMPRESSION[path.suffix]} file ({e}): damaged or truncated?") \
                from None


class _lines:
    """The lines of a (maybe compressed) text file, streamed, each decoded on its own so that an
    error names its line."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Iterator[str]:
        self.stream = _opened(self.path)
        return self._decoded(io.BufferedReader(self.stream))

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def _decoded(self, raw: io.BufferedReader) -> Iterator[str]:
        import pyarrow as pa

        number = 0  # lines read so far: an error is in the next one
        try:
            for line in raw:
                number += 1
                yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}:{number} is not UTF-8 text") from None
        except (OSError, EOFError, pa.ArrowException) as e:
            raise ValueError(f"{self.path}: cannot decompress past line {number} ({e}): damaged or truncated?") \
                from None


def _parquet_batches(path: Path, field: str) -> Iterator[list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path} has no column {field!r} (set --text-field; its columns: {', '.join(names)})")
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        yield batch.column(0).to_pylist()


def _dataset_batches(path: Path, field: str) -> Iterator[list]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a Hugging Face datasets folder: reading it needs `pip install datasets`") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds the splits {', '.join(dataset)}: pass one split's folder, "
                         f"such as {path / next(iter(dataset))}")
    if field not in dataset.column_names:
        raise ValueError(f"{path} has no column {field!r} (set --text-field; its columns: "
                         f"{', '.join(dataset.column_names)})")
    for batch in dataset.select_columns([field]).iter(batch_size=1024):
        yield batch[field]
