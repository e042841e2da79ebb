"""Token datasets: `prepare` turns a corpus into uint32 shards with a manifest; `TokenLoader` streams them.

A dataset directory holds `train-00000.bin`, `val-00000.bin`, ... (raw little-endian uint32 ids:
a 70000-token vocabulary does not fit uint16) and `manifest.json`, written last. The directory is
built under a temporary name and renamed when complete, so an interrupted run never leaves a
dataset that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from havoc_core.atomic import atomic_directory
from havoc_core.tokenizer import Corpus, HavocTokenizer
from havoc_core.tokenizer.corpus import COMPRESSION
from havoc_training import encoding

MANIFEST = "manifest.json"
FORMAT = "havoc-tokens-v1"
SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 26  # 64M tokens, 256 MB per shard file
_BATCH_BYTES = 1 << 20  # documents go to the workers in groups of about this many bytes


class _ShardWriter:
    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.documents = self.tokens = self.bytes = 0

    def write(self, ids: np.ndarray, text_bytes: int) -> None:
        """One document's ids."""
        self.documents += 1
        self.bytes += text_bytes
        self.extend(ids)

    def extend(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            self.file.write(chunk.tobytes())
            self.shards[-1]["tokens"] += len(chunk)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def prepare(
    corpus: Corpus,
    tokenizer: HavocTokenizer,
    out: str | os.PathLike,
    val_fraction: float = 0.05,
    shard_tokens: int = SHARD_TOKENS,
    show_progress: bool = False,
    workers: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> dict:
    """Tokenize every document of `corpus` as <|bos|> ids <|eos|> into a new dataset at `out`.

    Documents go to the validation split by a hash of their text (see `in_val_split`).
    This process reads the corpus and writes the shards; `workers` processes (default: one per
    core) tokenize groups of documents, and their results are written in the corpus's order, so
    the dataset is byte for byte the same for any number of workers. Returns the manifest.

    With `num_shards` K > 1 this run prepares part `shard_index` of K: a contiguous run of the
    input files, balanced by size, so that K machines share the work; `merge` joins the parts
    into the dataset one run would have made.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards) = [0, {num_shards}), got {shard_index}")
    sources = [str(p) for p in corpus.paths]
    if num_shards > 1:
        # A part may get no file (a file larger than a part's share): it is then an empty part.
        corpus = dataclasses.replace(corpus, paths=_share(corpus.files(), num_shards, shard_index), skipped=[])
    files = corpus.files() if corpus.paths else []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # fork, not spawn: spawn re-runs the caller's main module in each worker, which breaks any script
    # without a __main__ guard. The workers touch only tokenizers and numpy, never this process's threads.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=encoding.start, initargs=(tokenizer.to_str(),))
    with pool, atomic_directory(out) as tmp:
        writers = {split: _ShardWriter(tmp, split, shard_tokens) for split in SPLITS}
        # The text's size is known up front for plain files only (not compressed, Parquet or datasets).
        plain = all(f.is_file() and f.suffix not in (*COMPRESSION, ".parquet") for f in files)
        progress = tqdm(total=sum(f.stat().st_size for f in files) if plain else None, unit="B", unit_scale=True,
                        desc="tokenizing", disable=not show_progress)
        in_flight: deque = deque()  # the groups the workers have, oldest first: written in that order

        def write(most: int) -> None:
            while len(in_flight) > most:
                for val, ids, text_bytes in in_flight.popleft().result():
                    writers["val" if val else "train"].write(ids, text_bytes)
                    progress.update(text_bytes)

        try:
            group, group_bytes = [], 0
            for doc in corpus if files else []:
                group.append(doc.text)
                group_bytes += len(doc.text)
                if group_bytes >= _BATCH_BYTES:
                    in_flight.append(pool.submit(encoding.encode, group, val_fraction))
                    group, group_bytes = [], 0
                    write(2 * workers)  # bounded memory: a few groups per worker in flight
            if group:
                in_flight.append(pool.submit(encoding.encode, group, val_fraction))
            write(0)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            progress.close()
            for writer in writers.values():
                writer.close()
        splits = {split: writer.summary() for split, writer in writers.items()}
        if splits["train"]["tokens"] == 0 and num_shards == 1:
            raise ValueError("no document reached the training split: the corpus is empty")
        if val_fraction > 0 and splits["val"]["tokens"] == 0 and num_shards == 1:
            raise ValueError(
                f"no document fell into the validation split ({splits['train']['documents']} documents, "
                f"val_fraction {val_fraction}); raise --val-fraction or add documents"
            )
        manifest = {
            "format": FORMAT,
            "dtype": "uint32",
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "val_fraction": val_fraction,
            "sources": sources,
            "skipped_files": corpus.skipped,
            "splits": splits,
        }
        if num_shards > 1:  # `merge` checks and drops this
            manifest["part"] = {"index": shard_index, "count": num_shards, "shard_tokens": shard_tokens}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    return manifest


def _share(files: list[Path], parts: int, index: int) -> list[Path]:
    """Part `index` of `parts` contiguous runs of `files`, balanced by size (a file goes where it starts)."""
    sizes = [sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
             for p in files]
    total, start, chosen = max(1, sum(sizes)), 0, []
    for path, size in zip(files, sizes):
        if start * parts // total == index:
            chosen.append(path)
        start += size
    return chosen


def merge(parts: list[str | os.PathLike], out: str | os.PathLike, show_progress: bool = False) -> dict:
    """Join the parts that `prepare(num_shards=K, shard_index=I)` made into one dataset at `out`:
    the same shards and manifest as one `prepare` run over the whole input. Returns its manifest."""
    manifests = [load_manifest(p) for p in parts]
    for path, manifest in zip(parts, manifests):
        if "part" not in manifest:
            raise ValueError(f"{path} is a whole dataset, not a part of one (prepare parts with --num-shards)")
    count = manifests[0]["part"]["count"]
    indexes = sorted(m["part"]["index"] for m in manifests)
    if indexes != list(range(count)):
        missing = sorted(set(range(count)) - set(indexes))
        repeated = sorted({i for i in indexes if indexes.count(i) > 1})
        raise ValueError(f"the parts must be 0..{count - 1} of {count}, each once: "
                         + "; ".join([f"missing {missing}"] * bool(missing) + [f"repeated {repeated}"] * bool(repeated)))
    def run(manifest: dict) -> dict:  # what the parts of one run share
        return {**{key: manifest[key] for key in ("tokenizer_sha256", "vocab_size", "val_fraction", "sources", "dtype")},
                "part count": manifest["part"]["count"], "shard_tokens": manifest["part"]["shard_tokens"]}

    first = run(manifests[0])
    for path, manifest in zip(parts, manifests):
        differing = [key for key, value in run(manifest).items() if value != first[key]]
        if differing:
            raise ValueError(f"{path} differs from {parts[0]} in {differing[0]}: these are parts of different runs")
    ordered = sorted(zip(manifests, parts), key=lambda m: m[0]["part"]["index"])
    shard_tokens = manifests[0]["part"]["shard_tokens"]
    with atomic_directory(out) as tmp:
        splits = {}
        for split in SPLITS:
            writer = _ShardWriter(tmp, split, shard_tokens)
            try:
                for manifest, path in tqdm(ordered, desc=f"merging {split}", disable=not show_progress):
                    for shard in manifest["splits"][split]["shards"]:
                        tokens = np.memmap(Path(path) / shard["file"], dtype=np.uint32, mode="r")
                        for start in range(0, len(tokens), shard_tokens):
                            writer.extend(np.asarray(tokens[start : start + shard_tokens]))
            finally:
                writer.close()
            splits[split] = {**writer.summary(),
                             "documents": sum(m["splits"][split]["documents"] for m, _ in ordered),
                             "bytes": sum(m["splits"][split]["bytes"] for m, _ in ordered)}
        if splits["train"]["tokens"] == 0:
            raise ValueError("no document reached the training split: the corpus is empty")
        if manifests[0]["val_fraction"] > 0 and splits["val"]["tokens"] == 0:
            raise ValueError("no document fell into the validation split; prepare again with a larger --val-fraction")
        manifest = {key: value for key, value in ordered[0][0].items() if key != "part"}
        manifest["skipped_files"] = [f for m, _ in ordered for f in m["skipped_files"]]
        manifest["splits"] = splits
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(data_dir: str | os.PathLike, tokenizer: HavocTokenizer | None = None) -> dict:
    """The manifest of a prepared dataset, checked for completeness and, if given, the tokenizer."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {data_dir} is not a finished dataset (run `havoc data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if tokenizer is not None and manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise ValueError(
            f"{data_dir} was prepared with another tokenizer (sha256 {manifest['tokenizer_sha256'][:12]}..., "
            f"this one is {tokenizer.sha256[:12]}...); prepare the data again with this tokenizer"
        )
    return manifest


class EpochBatches:
    """Serves micro-batches of items in a seeded order per epoch, in global batches: an optimizer step
    takes the next `global_batch = batch_size x world_size x accumulation` items of the order, rank r
    of world_size every world_size-th of them. So the items of each step depend on the seed and the
    global batch only, not on the number of processes: a run resumed with another number continues
    with the same global batches. `state_dict()` records the exact position, in items of the epoch.
    Subclasses set `num_items` and build `batch(indices)`.
    """

    def _setup_order(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int, shuffle: bool,
                     accumulation: int) -> None:
        if batch_size < 1 or accumulation < 1:
            raise ValueError(f"batch_size and accumulation must be >= 1, got {batch_size} and {accumulation}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.global_batch = batch_size * world_size * accumulation
        self.items_per_epoch = num_items // self.global_batch * self.global_batch  # whole steps only
        self.batches_per_epoch = self.items_per_epoch // (batch_size * world_size)  # micro-batches, each rank
        self.rewind()  # epoch, and position: the micro-batches of this epoch already served
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _rank_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
            else:
                order = np.arange(self.num_items)
            self._order = order[: self.items_per_epoch][self.rank :: self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64; epochs roll over by themselves."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        self.position += 1
        return self.batch(self._rank_order()[start : start + self.batch_size])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self):
        while True:
            yield self.next_batch()

    def rewind(self) -> None:
        """Back to the first batch of the first epoch."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        """The same on every rank and for any number of processes: items served, all ranks together."""
        return {"epoch": self.epoch, "items": self.position * self.batch_size * self.world_size, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"loader state is for another data order ({details})")
        per_pass = self.batch_size * self.world_size
        if int(state["items"]) % per_pass:
            raise ValueError(f"loader state stops {state['items']} items into an epoch, not a whole number of passes "
                             f"of {self.batch_size} x {self.world_size} processes: resume at an optimizer step")
        self.epoch, self.position = int(state["epoch"]), int(state["items"]) // per_pass

    def _identity(self) -> dict:
        return {"num_items": self.num_items, "global_batch": self.global_batch, "seed": self.seed,
                "shuffle": self.shuffle}


class TokenLoader(EpochBatches):
    """Batches of fixed windows from a prepared split, for next-token training.

    Each window is `seq_len + 1` consecutive tokens (inputs are the first seq_len, targets the
    last seq_len); windows start every seq_len tokens within a shard, and documents are packed
    across window boundaries. Windows are ordered and split across ranks by `EpochBatches`, so a
    resumed run sees exactly the tokens an uninterrupted one would.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        tokenizer: HavocTokenizer | None = None,
        accumulation: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.manifest = load_manifest(data_dir, tokenizer)
        self.seq_len, self.split = seq_len, split
        self.shards = [self._open(Path(data_dir), shard) for shard in self.manifest["splits"][split]["shards"]]
        windows = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self._first_window = np.cumsum([0, *windows])
        self._setup_order(int(self._first_window[-1]), batch_size, seed, rank, world_size, shuffle, accumulation)
        if self.batches_per_epoch == 0 and split == "train":  # a small or empty validation split is allowed
            tokens = self.manifest["splits"][split]["tokens"]
            raise ValueError(
                f"the {split} split has {tokens} tokens: too few for one step of {self.global_batch} x "
                f"{seq_len + 1} tokens (global_batch_tokens / seq_len windows); use more data or smaller batches"
            )

    @staticmethod
    def _open(data_dir: Path, shard: dict) -> np.ndarray:
        path = data_dir / shard["file"]
        expected = shard["tokens"] * 4
        if not path.exists() or path.stat().st_size != expected:
            size = path.stat().st_size if path.exists() else "missing"
            raise ValueError(f"shard {path} is {size} bytes, the manifest says {expected}: prepare the dataset again")
        return np.memmap(path, dtype=np.uint32, mode="r")

    def batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        shard_of = np.searchsorted(self._first_window, windows, side="right") - 1
        batch = np.stack([
            self.shards[s][(w - self._first_window[s]) * self.seq_len :][: self.seq_len + 1]
            for w, s in zip(windows, shard_of)
        ]).astype(np.int64)
        tokens = torch.from_numpy(batch)
        return tokens[:, :-1], tokens[:, 1:]

    def _identity(self) -> dict:
        return {**super()._identity(), "split": self.split, "seq_len": self.seq_len,
                "tokenizer_sha256": self.manifest["tokenizer_sha256"]}
