"""Loaders for the shipped tasks: local JSONL beside this file, so no download is ever attempted."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _load(name: str, **_) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:
    return _load("mc.jsonl", **kwargs)


def load_gen(**kwargs) -> datasets.DatasetDict:
    return _load("gen.jsonl", **kwargs)
