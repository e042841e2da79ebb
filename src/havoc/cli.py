"""`havoc`: the command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
    from havoc_core.interop import havoc_to_hf, hf_to_havoc

    convert = havoc_to_hf if args.direction == "havoc-to-hf" else hf_to_havoc
    print(f"wrote {convert(args.src, args.dst)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="havoc", description="HAVOC: train, serve and evaluate Llama-class models.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert checkpoints between HAVOC and Hugging Face Llama")
    convert.add_argument("direction", choices=["havoc-to-hf", "hf-to-havoc"])
    convert.add_argument("src", help="checkpoint directory to read")
    convert.add_argument("dst", help="new directory to write (must not exist or be empty)")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        # Expected user errors: one clear line, no traceback.
        print(f"havoc {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
