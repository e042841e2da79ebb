"""Corpus formats: JSONL (plain, .gz, .zst), Parquet and `datasets` folders give the same documents,
streamed; damaged or mislabelled inputs are named."""

import gzip
import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from havoc_core.tokenizer import Corpus
from havoc_training.data import prepare

# Unicode, a line separator inside a string (JSON allows it raw; it is not a line break), an empty text.
TEXTS = ["def f(x):\n    return x\n", "héllo wörld \u2028 still one record", "", "class A:\n    pass\n"] * 5


def _write_jsonl(path, texts, compression=None, field="text"):
    lines = "".join(json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    with pa.output_stream(str(path), compression=compression) as out:
        out.write(lines.encode("utf-8"))


@pytest.fixture
def inputs(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    _write_jsonl(tmp_path / "d.jsonl.gz", TEXTS, "gzip")
    _write_jsonl(tmp_path / "d.jsonl.zst", TEXTS, "zstd")
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), tmp_path / "d.parquet", row_group_size=7)
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}).save_to_disk(str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet", "hf"])
def test_every_format_gives_the_same_documents(inputs, name):
    documents = list(Corpus([inputs / name]))
    assert [d.text for d in documents] == [t for t in TEXTS if t]
    numbers = [i + 1 for i, t in enumerate(TEXTS) if t]  # line or row numbers, from 1
    assert [d.source for d in documents] == [f"{name}:{n}" for n in numbers]


def test_a_compressed_text_file_is_one_document(tmp_path):
    (tmp_path / "a.py.gz").write_bytes(gzip.compress("print('hi')\n".encode()))
    assert [d.text for d in Corpus([tmp_path / "a.py.gz"])] == ["print('hi')\n"]


def test_prepare_reads_parquet_with_a_text_field(tmp_path, tokenizer):
    texts = [f"def f_{i}(x):\n    return x + {i}\n" for i in range(300)]
    pq.write_table(pa.table({"content": texts}), tmp_path / "code.parquet")
    _write_jsonl(tmp_path / "code.jsonl", texts, field="content")
    manifests = []
    for name in ("code.parquet", "code.jsonl"):
        prepare(Corpus([tmp_path / name], text_field="content"), tokenizer, tmp_path / f"out-{name}", val_fraction=0.3)
        manifests.append(json.loads((tmp_path / f"out-{name}" / "manifest.json").read_text()))
    assert manifests[0]["splits"] == manifests[1]["splits"]  # the same tokens from either format


def test_bad_inputs_are_named(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"d.parquet has no column 'body' \(set --text-field; its columns: id, text\)"):
        list(Corpus([inputs / "d.parquet"], text_field="body"))
    with pytest.raises(ValueError, match=r"hf has no column 'body' .*columns: text, id"):
        list(Corpus([inputs / "hf"], text_field="body"))
    with pytest.raises(ValueError, match=r"d.jsonl.zst:1 has no string field 'body'"):
        list(Corpus([inputs / "d.jsonl.zst"], text_field="body"))
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds the splits train, test: pass one split's folder"):
        list(Corpus([tmp_path / "dd"]))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes((inputs / "d.jsonl.gz").read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: cannot decompress past line \d+ .*damaged or truncated"):
        list(Corpus([truncated]))
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2 is not UTF-8 text"):
        list(Corpus([tmp_path / "latin.jsonl"]))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"fake.parquet is not a readable Parquet file"):
        list(Corpus([tmp_path / "fake.parquet"]))


def test_a_200_mb_jsonl_zst_streams_in_bounded_memory(tmp_path):
    """200 MB of JSONL (about 100,000 records of 2 KB): the reader's peak memory grows by far less."""
    path = tmp_path / "big.jsonl.zst"
    record = json.dumps({"text": "x = 1\n" * 340}) + "\n"  # ~2 KB
    with pa.output_stream(str(path), compression="zstd") as out:
        chunk = (record * 1000).encode()
        for _ in range(200 * 2**20 // len(chunk) + 1):
            out.write(chunk)
    script = textwrap.dedent(f"""
        import resource
        from havoc_core.tokenizer import Corpus
        import pyarrow, pyarrow.parquet
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = sum(len(d.text) for d in Corpus([{str(path)!r}]))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(size, (after - before) // 1024)
    """)
    size, grown_mb = map(int, subprocess.check_output([sys.executable, "-c", script], text=True).split())
    assert size > 170 * 2**20  # the texts of 200 MB of JSONL
    assert grown_mb < 64, f"reading grew the process by {grown_mb} MB"
