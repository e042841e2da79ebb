"""Data pipeline: prepared shards are lossless and complete-or-absent; the loader is exact and resumable."""

import json
from pathlib import Path
from collections import Counter
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from havoc_core.tokenizer import Corpus, HavocTokenizer
from havoc_training.data import TokenLoader, load_manifest, prepare


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer, corpus_files):
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(Corpus(corpus_files), tokenizer, out, val_fraction=0.1, shard_tokens=20_000)
    return out


def _tokens(directory, split):
    manifest = load_manifest(directory)
    return np.concatenate([np.fromfile(directory / s["file"], dtype=np.uint32) for s in manifest["splits"][split]["shards"]])


def test_shards_hold_every_document_losslessly(dataset, tokenizer, corpus_files):
    manifest = load_manifest(dataset, tokenizer)
    texts = {}
    for split in ("train", "val"):
        tokens = _tokens(dataset, split)
        assert tokens.dtype == np.uint32 and len(tokens) == manifest["splits"][split]["tokens"]
        bos = np.flatnonzero(tokens == tokenizer.bos_token_id)
        eos = np.flatnonzero(tokens == tokenizer.eos_token_id)
        assert len(bos) == len(eos) == manifest["splits"][split]["documents"]
        texts[split] = [tokenizer.decode(tokens[b + 1:e].tolist()) for b, e in zip(bos, eos)]
        assert sum(len(t.encode()) for t in texts[split]) == manifest["splits"][split]["bytes"]
    originals = [p.read_text() for p in corpus_files if p.stat().st_size]
    assert sorted(texts["train"] + texts["val"]) == sorted(originals)
    assert not set(texts["train"]) & set(texts["val"])
    assert len(manifest["splits"]["train"]["shards"]) > 3  # shard_tokens=20k forced several


def test_prepare_is_deterministic(tmp_path, dataset, tokenizer, corpus_files):
    prepare(Corpus(corpus_files), tokenizer, tmp_path / "again", val_fraction=0.1, shard_tokens=20_000)
    for name in os.listdir(dataset):
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes(), name


@pytest.mark.parametrize("workers", [1, 3])
def test_the_dataset_is_the_same_for_any_number_of_workers(tmp_path, dataset, tokenizer, corpus_files, workers):
    prepare(Corpus(corpus_files), tokenizer, tmp_path / "ds", val_fraction=0.1, shard_tokens=20_000, workers=workers)
    assert sorted(os.listdir(tmp_path / "ds")) == sorted(os.listdir(dataset))
    for name in os.listdir(dataset):  # the fixture's dataset used one worker per core
        assert (tmp_path / "ds" / name).read_bytes() == (dataset / name).read_bytes(), name
    with pytest.raises(ValueError, match="workers must be at least 1"):
        prepare(Corpus(corpus_files), tokenizer, tmp_path / "none", workers=-1)


def test_loader_windows_are_shifted_consecutive_tokens(dataset):
    loader = TokenLoader(dataset, seq_len=32, batch_size=4, seed=0)
    shards = [np.fromfile(dataset / s["file"], dtype=np.uint32) for s in loader.manifest["splits"]["train"]["shards"]]
    expected = Counter(tuple(s[i:i + 33]) for s in shards for i in range(0, len(s) - 32, 32))
    seen = []
    for _ in range(loader.batches_per_epoch):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, 32)
        assert (inputs[:, 1:] == targets[:, :-1]).all()
        seen += [tuple(row) for row in np.concatenate((inputs.numpy(), targets.numpy()[:, -1:]), axis=1)]
    # Real code repeats itself (licence headers...), so compare multisets: no window is served
    # more often than it occurs, and at most a partial batch is left out.
    assert not Counter(seen) - expected
    assert expected.total() - len(seen) < 4


def test_loader_order_comes_from_the_seed(dataset):
    def first(seed):
        return TokenLoader(dataset, seq_len=16, batch_size=8, seed=seed).next_batch()[0]

    assert (first(1) == first(1)).all() and not (first(1) == first(2)).all()
    ordered = TokenLoader(dataset, seq_len=16, batch_size=2, shuffle=False).next_batch()[0]
    first_shard = np.fromfile(dataset / "train-00000.bin", dtype=np.uint32)
    assert ordered[1].tolist() == first_shard[16:32].tolist()


def test_each_epoch_is_a_new_order_of_every_window(dataset):
    loader = TokenLoader(dataset, seq_len=16, batch_size=4, seed=3)
    served = []
    real = loader.batch
    loader.batch = lambda windows: served.append(windows.tolist()) or real(windows)  # which windows each batch holds
    epochs = []
    for _ in range(3):
        served.clear()
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()
        epochs.append([w for batch in served for w in batch])
    count = loader.batches_per_epoch * 4
    for seen in epochs:  # each epoch serves distinct windows, all of them but a batch's remainder
        assert len(seen) == len(set(seen)) == count and loader.num_items - count < 4
        assert set(seen) <= set(range(loader.num_items))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_ranks_split_without_overlap(dataset):
    single = TokenLoader(dataset, seq_len=16, batch_size=8, seed=3)
    ranks = [TokenLoader(dataset, seq_len=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        together = {tuple(x) for x in single.next_batch()[0].tolist()}
        parts = [{tuple(x) for x in r.next_batch()[0].tolist()} for r in ranks]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == together  # same global batch as one process


def test_each_step_takes_the_same_items_for_any_number_of_processes(dataset):
    """Global batches of 12 items as 1 x 6 x 2, 2 x 3 x 2, 3 x 2 x 2 and 6 x 1 x 2 (processes x micro-batch
    x accumulation), across epoch boundaries; and a position saved by one layout resumes in another."""
    layouts = [(1, 6, 2), (2, 3, 2), (3, 2, 2), (6, 1, 2)]

    def loaders(world_size, batch_size, accumulation):
        return [TokenLoader(dataset, seq_len=64, batch_size=batch_size, seed=4, rank=r, world_size=world_size,
                            accumulation=accumulation) for r in range(world_size)]

    def step(ranks):  # every rank's micro-batches of one optimizer step, as one set of windows
        return {tuple(x) for loader in ranks for _ in range(12 // loader.batch_size // loader.world_size)
                for x in loader.next_batch()[0].tolist()}

    runs = [loaders(*layout) for layout in layouts]
    steps = runs[0][0].num_items // 12 + 3  # past the end of the first epoch
    assert len({r[0].batches_per_epoch * r[0].batch_size * r[0].world_size for r in runs}) == 1
    for _ in range(steps):
        batches = [step(ranks) for ranks in runs]
        assert all(len(b) == 12 and b == batches[0] for b in batches)
    states = [loader.state_dict() for ranks in runs for loader in ranks]
    assert all(state == states[0] for state in states) and states[0]["epoch"] == 1
    moved = loaders(2, 3, 2)
    for loader in moved:
        loader.load_state_dict(json.loads(json.dumps(runs[2][0].state_dict())))
    assert step(moved) == step(runs[0])
    odd = loaders(2, 3, 2)[0]
    odd.next_batch()  # half a step: no checkpoint stops there
    with pytest.raises(ValueError, match="not a whole number of passes of 12 x 1 processes"):
        loaders(1, 12, 1)[0].load_state_dict(odd.state_dict())
    with pytest.raises(ValueError, match="global_batch: saved 12, now 24"):
        loaders(2, 6, 2)[0].load_state_dict(states[0])


def test_resume_is_exact_across_epochs(dataset):
    loader = TokenLoader(dataset, seq_len=64, batch_size=8, seed=5)
    total = loader.batches_per_epoch + 3  # crosses an epoch boundary
    straight = [loader.next_batch()[0] for _ in range(total)]
    first = TokenLoader(dataset, seq_len=64, batch_size=8, seed=5)
    for _ in range(total - 5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a trip through a file
    resumed = TokenLoader(dataset, seq_len=64, batch_size=8, seed=5)
    resumed.load_state_dict(state)
    for expected in straight[-5:]:
        assert (resumed.next_batch()[0] == expected).all()
    assert resumed.epoch == 1


def test_state_for_another_order_is_refused(dataset):
    state = TokenLoader(dataset, seq_len=64, batch_size=8, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed: saved 5, now 6"):
        TokenLoader(dataset, seq_len=64, batch_size=8, seed=6).load_state_dict(state)


def test_val_split_loader(dataset):
    val = TokenLoader(dataset, seq_len=16, batch_size=2, split="val", shuffle=False)
    assert val.next_batch()[0].shape == (2, 16)


# Bad input
def test_data_made_with_another_tokenizer_is_refused(dataset):
    other = HavocTokenizer.train([f"other corpus {i}" for i in range(50)], vocab_size=300)
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        TokenLoader(dataset, seq_len=16, batch_size=2, tokenizer=other)


def test_too_little_data_for_a_batch(dataset):
    with pytest.raises(ValueError, match="too few for one step of 4096 x 4097 tokens"):
        TokenLoader(dataset, seq_len=4096, batch_size=4096, split="train")
    # A validation split may be smaller than a batch (it is scored item by item), or empty.
    assert TokenLoader(dataset, seq_len=4096, batch_size=512, split="val").batches_per_epoch == 0


def test_truncated_shard_and_missing_manifest(tmp_path, dataset):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(dataset):
        (copy / name).write_bytes((dataset / name).read_bytes())
    shard = copy / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(ValueError, match="train-00001.bin is .* bytes, the manifest says"):
        TokenLoader(copy, seq_len=16, batch_size=2)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished dataset"):
        TokenLoader(copy, seq_len=16, batch_size=2)


def test_empty_val_split_is_an_error(tmp_path, tokenizer, corpus_files):
    with pytest.raises(ValueError, match="no document fell into the validation split"):
        prepare(Corpus(corpus_files[:2]), tokenizer, tmp_path / "ds", val_fraction=0.001)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing(tmp_path, tokenizer, corpus_files, monkeypatch):
    from havoc_training.data import _ShardWriter

    calls, write = [], _ShardWriter.write

    def failing(self, ids, text_bytes):  # Ctrl-C midway, with groups still at the workers
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        write(self, ids, text_bytes)

    monkeypatch.setattr(_ShardWriter, "write", failing)
    monkeypatch.setattr("havoc_training.data._BATCH_BYTES", 50_000)
    with pytest.raises(KeyboardInterrupt):
        prepare(Corpus(corpus_files), tokenizer, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields.get("PPid", "0")) == pid:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps counts as gone)."""
    try:
        return not Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def test_sigkill_never_leaves_a_dataset_that_looks_complete(tmp_path, tokenizer_dir):
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "havoc.cli", "data", "prepare", "--tokenizer", str(tokenizer_dir),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".ds.*.partial/train-00000.bin")) and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert workers, "no worker processes to check"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # the killed run's workers notice and leave: no orphans
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    stale = list(tmp_path.glob(".ds.*.partial"))
    assert stale, "the kill came too late to test anything"
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="not a finished dataset"):
        load_manifest(out)
    # The next run into the same place removes what the killed one left, and says so; a partial folder
    # from another machine may still be in use there, so it is only reported.
    foreign = tmp_path / ".ds.0badc0de-1.xyz.partial"
    foreign.mkdir()
    again = subprocess.run([sys.executable, "-m", "havoc.cli", "data", "prepare", "--tokenizer", str(tokenizer_dir),
                            "--out", str(out), "--val-fraction", "0.01"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"removed {stale[0]}: left by an interrupted run" in again.stderr
    assert f"{foreign} looks left by an interrupted run on another machine" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "ds"]
    load_manifest(out)


def test_cli_prepare(tmp_path, tokenizer_dir, corpus_files):
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "data", "prepare", *map(str, corpus_files[:40]),
                          "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "ds"), "--val-fraction", "0.1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "MB/s" in run.stdout and "train:" in run.stdout
    again = subprocess.run([sys.executable, "-m", "havoc.cli", "data", "prepare", *map(str, corpus_files[:40]),
                            "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "ds")], capture_output=True, text=True)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr


def test_split_does_not_depend_on_where_the_data_lives(tmp_path, tokenizer, corpus_files):
    manifests = []
    for place in ("here", "elsewhere/deeper"):
        folder = tmp_path / place / "src"
        folder.mkdir(parents=True)
        for p in corpus_files[:40]:
            (folder / p.name).write_bytes(p.read_bytes())
        manifests.append(prepare(Corpus([folder]), tokenizer, tmp_path / place / "ds", val_fraction=0.2))
    assert manifests[0]["splits"] == manifests[1]["splits"]


def test_three_parts_merge_into_the_one_machine_dataset(tmp_path, tokenizer_dir, corpus_files):
    """Three `--num-shards 3` runs (as three machines would), then `havoc data merge`: the same
    shards and manifest as one run over the whole input."""
    from havoc.cli import main

    inputs = [str(p) for p in corpus_files]
    common = ["--tokenizer", str(tokenizer_dir), "--val-fraction", "0.1", "--workers", "1"]
    assert main(["data", "prepare", *inputs, *common, "--out", str(tmp_path / "whole")]) == 0
    for i in (2, 0, 1):  # any order
        assert main(["data", "prepare", *inputs, *common, "--num-shards", "3", "--shard-index", str(i),
                     "--out", str(tmp_path / f"part-{i}")]) == 0
    parts = [load_manifest(tmp_path / f"part-{i}") for i in range(3)]
    assert all(p["splits"]["train"]["documents"] > 0 for p in parts)  # each machine had real work
    assert main(["data", "merge", *(str(tmp_path / f"part-{i}") for i in (1, 2, 0)), "--out", str(tmp_path / "merged")]) == 0
    whole, merged = tmp_path / "whole", tmp_path / "merged"
    assert sorted(os.listdir(merged)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    assert main(["data", "merge", str(tmp_path / "part-0"), str(tmp_path / "part-2"), "--out", str(tmp_path / "m2")]) == 1
    assert main(["data", "merge", str(whole), "--out", str(tmp_path / "m3")]) == 1
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_merge_errors_name_the_problem(tmp_path, tokenizer, corpus_files):
    from havoc_training.data import merge

    for i in range(2):
        prepare(Corpus(corpus_files), tokenizer, tmp_path / f"p{i}", val_fraction=0.1, num_shards=2, shard_index=i)
    prepare(Corpus(corpus_files[:30]), tokenizer, tmp_path / "other", val_fraction=0.1, num_shards=2, shard_index=1)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        merge([tmp_path / "p0"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"repeated \[0\]"):
        merge([tmp_path / "p0", tmp_path / "p0", tmp_path / "p1"], tmp_path / "out")
    with pytest.raises(ValueError, match="differs .* in sources"):
        merge([tmp_path / "p0", tmp_path / "other"], tmp_path / "out")
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, num_shards\)"):
        prepare(Corpus(corpus_files), tokenizer, tmp_path / "bad", num_shards=2, shard_index=2)
