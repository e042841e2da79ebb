"""Peak memory and time of `havoc tokenizer train` and `havoc data prepare` on one long document.

The same text (the embedded corpus's first --megabytes MB) three ways, each command in a fresh
process, its peak RSS read from the kernel:
- as --megabytes files of 1 MB (the reference: what a document costs when it is short);
- as one JSONL line, fed to `tokenizers` in pieces (HAVOC as shipped);
- as one JSONL line, fed whole (PIECE_CHARS raised past the document: HAVOC before pieces).

    .venv/bin/python benchmarks/bench_pieces.py [--megabytes 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from havoc_core.tokenizer import stdlib_corpus
from havoc_eval.bench import cpu_model, markdown_table

# Runs one `havoc` command with the tokenizer's piece size set, then prints the child's peak RSS (KiB).
RUN = """
import resource, sys
from havoc_core.tokenizer import tokenizer
tokenizer.PIECE_CHARS = int(sys.argv[1])
from havoc.cli import main
code = main(sys.argv[2:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run(piece_chars: int, *args: str) -> tuple[float, float]:
    """(peak MB, seconds) of one command in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, str(piece_chars), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return int(done.stderr.strip().splitlines()[-1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    size = args.megabytes * 1_000_000
    text = "".join(p.read_text() for p in stdlib_corpus())[:size]
    (tmp / "files").mkdir()
    for i in range(args.megabytes):
        (tmp / "files" / f"{i:03d}.txt").write_text(text[i * 1_000_000 : (i + 1) * 1_000_000])
    (tmp / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")

    from havoc_core.tokenizer.tokenizer import PIECE_CHARS

    whole = 10 * size  # larger than the document: fed whole
    ways = [(f"{args.megabytes} files of 1 MB (reference)", "files", PIECE_CHARS),
            ("one line, in pieces (HAVOC)", "one.jsonl", PIECE_CHARS),
            ("one line, whole (before pieces)", "one.jsonl", whole)]
    train, prepare = {}, {}
    for i, (name, source, piece_chars) in enumerate(ways):
        train[name] = run(piece_chars, "tokenizer", "train", str(tmp / source), "--vocab-size", "4000",
                          "--val-fraction", "0", "--out", str(tmp / f"tok{i}"))
    for i, (name, source, piece_chars) in enumerate(ways):
        prepare[name] = run(piece_chars, "data", "prepare", str(tmp / source), "--tokenizer", str(tmp / "tok0"),
                            "--val-fraction", "0", "--out", str(tmp / f"data{i}"))
    reference = ways[0][0]
    print(f"# {date.today()} | {cpu_model()} ({platform.machine()}) | {args.megabytes} MB of the embedded corpus")
    rows = []
    for command, results in (("tokenizer train", train), ("data prepare", prepare)):
        for name, (peak, seconds) in results.items():
            rows.append((f"{command}: {name}", f"{peak:.0f}", f"{peak / results[reference][0]:.2f}x", f"{seconds:.1f}"))
    print(markdown_table(["input", "peak RSS (MB)", "/ reference", "seconds"], rows))


if __name__ == "__main__":
    main()
