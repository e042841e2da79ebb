"""`havoc`: the command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from havoc_training.config import add_override_flags


def _convert(args: argparse.Namespace) -> None:
    from havoc_core.interop import havoc_to_hf, hf_to_havoc

    if args.direction == "havoc-to-gguf":
        from havoc_core.interop.gguf import havoc_to_gguf

        print(f"wrote {havoc_to_gguf(args.src, args.dst, type=args.type, tokenizer=args.tokenizer)}")
        return
    if args.direction == "havoc-to-hf":
        out = havoc_to_hf(args.src, args.dst, tokenizer=args.tokenizer)
        if not (out / "tokenizer.json").exists():
            print(f"note: {args.src} has no tokenizer beside it, so {out} has none either (pass --tokenizer)",
                  file=sys.stderr)
    else:
        out = hf_to_havoc(args.src, args.dst)
    print(f"wrote {out}")


def _corpus(args: argparse.Namespace):
    from havoc_core.tokenizer import Corpus, stdlib_corpus

    if args.inputs:
        return Corpus(args.inputs, include=args.include, text_field=args.text_field)
    print("no INPUT given: using the embedded corpus (the Python standard library's source)", file=sys.stderr)
    return Corpus(stdlib_corpus())


def _report_skipped(corpus) -> None:
    if corpus.skipped:
        print(f"skipped {len(corpus.skipped)} files that are not UTF-8 text, e.g. {corpus.skipped[0]}", file=sys.stderr)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from havoc_core.atomic import atomic_directory
    from havoc_core.tokenizer import HavocTokenizer
    from havoc_core.tokenizer.corpus import in_val_split

    corpus = _corpus(args)
    docs = list(corpus)
    train = [d.text for d in docs if not in_val_split(d.text, args.val_fraction)]
    held_out = [d.text for d in docs if in_val_split(d.text, args.val_fraction)]
    megabytes = sum(len(t.encode("utf-8")) for t in train) / 1e6
    start = time.perf_counter()
    tokenizer = HavocTokenizer.train(train, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                     show_progress=True)
    seconds = time.perf_counter() - start
    with atomic_directory(args.out) as tmp:
        tokenizer.save(tmp)
    _report_skipped(corpus)
    print(f"trained a {tokenizer.vocab_size}-token tokenizer on {megabytes:.1f} MB in {seconds:.1f}s "
          f"({megabytes / seconds:.1f} MB/s); wrote {args.out}")
    if held_out:
        print(f"compression on {len(held_out)} held-out documents: {tokenizer.bytes_per_token(held_out):.2f} bytes/token")


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from havoc_core.tokenizer import HavocTokenizer

    text = sys.stdin.read() if args.text == "-" else args.text
    print(" ".join(map(str, HavocTokenizer.load(args.tokenizer).encode(text, allow_special=args.allow_special))))


def _tokenizer_decode(args: argparse.Namespace) -> None:
    from havoc_core.tokenizer import HavocTokenizer

    print(HavocTokenizer.load(args.tokenizer).decode(args.ids, skip_special_tokens=args.skip_special_tokens))


def _data_prepare(args: argparse.Namespace) -> None:
    from havoc_core.tokenizer import HavocTokenizer
    from havoc_training.data import prepare

    tokenizer = HavocTokenizer.load(args.tokenizer)
    corpus = _corpus(args)
    start = time.perf_counter()
    manifest = prepare(corpus, tokenizer, args.out, val_fraction=args.val_fraction, show_progress=True,
                       workers=args.workers, num_shards=args.num_shards, shard_index=args.shard_index)
    seconds = time.perf_counter() - start
    _report_skipped(corpus)
    splits = manifest["splits"]
    megabytes = sum(s["bytes"] for s in splits.values()) / 1e6
    for name, s in splits.items():
        print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    print(f"prepared {megabytes:.1f} MB in {seconds:.1f}s ({megabytes / seconds:.1f} MB/s); wrote {args.out}")


def _data_merge(args: argparse.Namespace) -> None:
    from havoc_training.data import merge

    manifest = merge(args.parts, args.out, show_progress=True)
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    print(f"merged {len(args.parts)} parts into {args.out}")


def _train(args: argparse.Namespace) -> None:
    from havoc_training.config import load_config, overrides_from
    from havoc_training.trainer import Trainer

    config = load_config(args.config, overrides_from(args))
    if args.dry_run:
        from havoc_training.memory import dry_run

        if int(os.environ.get("RANK", "0")) == 0:
            print(dry_run(config))
        return
    summary = Trainer(config, resume=args.resume, chat=args.command == "finetune", overwrite=args.overwrite).train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))


def _export(args: argparse.Namespace) -> None:
    from havoc_training.checkpoint import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)}")


def _quickstart(args: argparse.Namespace) -> None:
    from havoc_training.quickstart import quickstart

    quickstart(args.out, args.max_steps)


def _eval_perplexity(args: argparse.Namespace) -> None:
    import json

    from havoc_core.pretrained import load_model_and_tokenizer
    from havoc_eval.perplexity import perplexity, read_texts

    model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.tokenizer, device=args.device, dtype=args.dtype,
                                                quantize=args.quantize)
    result = perplexity(model, tokenizer, read_texts(args.data, args.text_field), context=args.context,
                        stride=args.stride, batch_size=args.batch_size, show_progress=True)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


def _eval_humaneval(args: argparse.Namespace) -> None:
    import json

    from havoc_core.pretrained import load_model_and_tokenizer
    from havoc_eval import humaneval
    from havoc_eval.bench import markdown_table
    from havoc_eval.sandbox import Limits

    ks = args.k or [k for k in (1, 10, 100) if k <= args.samples_per_task]
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.tokenizer, device=args.device, dtype=args.dtype,
                                                quantize=args.quantize)
    max_tokens = min(args.max_tokens, model.config.max_seq_len // 2)
    if max_tokens < args.max_tokens:
        print(f"note: max_tokens {args.max_tokens} cut to {max_tokens}, half the model's context", file=sys.stderr)
    if args.allow_unsandboxed:
        print("warning: --allow-unsandboxed: completions run with time and memory limits only, with this "
              "machine's network and files within their reach", file=sys.stderr)
    result = humaneval.evaluate(model, tokenizer, samples_per_task=args.samples_per_task, temperature=args.temperature,
                                top_p=args.top_p, ks=tuple(ks), limit=args.limit, max_tokens=max_tokens,
                                seed=args.seed, slots=args.slots, sandboxed=not args.allow_unsandboxed,
                                limits=Limits(timeout=args.timeout))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    rows = [(f"pass@{k}", f"{result[f'pass@{k}']:.4f}") for k in ks]
    rows += [("problems x samples", f"{result['problems']} x {result['samples_per_task']}"),
             ("seconds per problem", f"{result['seconds_per_problem']:.2f}")]
    print(markdown_table(["HumanEval", Path(args.checkpoint).name], rows))


def _bench(args: argparse.Namespace) -> None:
    import json

    from havoc_eval.bench import bench, chart, table

    result = bench(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                   prefill_tokens=args.prefill_tokens,
                   new_tokens=args.new_tokens, decode_batches=tuple(args.decode_batch), train_batch=args.train_batch,
                   train_seq=args.train_seq,
                   repeats=args.repeats)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.chart:
        chart(result, args.chart)


def _serve(args: argparse.Namespace) -> None:
    from havoc_inference.server import serve

    if args.draft and not args.speculate:
        raise ValueError("--draft needs --speculate K: the tokens the draft guesses per step")
    serve(args.checkpoint, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
          tokenizer=args.tokenizer, model_name=args.model_name, api_key=args.api_key, slots=args.slots,
          context=args.context, device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
          max_queue=args.max_queue, max_seqs_per_request=args.max_seqs_per_request,
          kv_cache_tokens=args.kv_cache_tokens, prefix_caching=not args.no_prefix_cache, step_tokens=args.step_tokens,
          speculate=args.speculate, draft=args.draft)


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="files, folders or .jsonl files (default: the embedded standard-library corpus)")
    parser.add_argument("--include", nargs="+", default=["*"], metavar="GLOB",
                        help="file-name patterns to take from folders (default: all)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of documents held out for validation, chosen by a hash of their text")


# havoc_core's DTYPES and quantize.SCHEMES, without importing torch to parse flags.
DTYPE_CHOICES = ["bfloat16", "float16", "float32"]
QUANTIZE_CHOICES = ["int8", "int4"]


def _add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="weights and compute dtype (default: bfloat16 on "
                                                               "cuda, float32 on the cpu; bfloat16 when quantized)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="torchao weight-only quantization of the linear layers at load: int8 per channel, "
                             "int4 in groups of 32 (a `havoc quantize` folder is quantized already)")


def _quantize(args: argparse.Namespace) -> None:
    from havoc_core.atomic import atomic_directory
    from havoc_core.pretrained import load_model_and_tokenizer
    from havoc_core.quantize import describe

    model, tokenizer = load_model_and_tokenizer(args.src, args.tokenizer, device=args.device, quantize=args.scheme)
    with atomic_directory(args.dst) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
    kept = describe(model)["bfloat16_layers"]
    print(f"wrote {args.dst} ({args.scheme}, packed for {args.device}"
          + (f"; kept in bfloat16, shapes the kernel cannot hold: {', '.join(kept)}" if kept else "") + ")")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="havoc", description="HAVOC: train, serve and evaluate Llama-class models.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert checkpoints between HAVOC and Hugging Face Llama")
    convert.add_argument("direction", choices=["havoc-to-hf", "hf-to-havoc", "havoc-to-gguf"])
    convert.add_argument("src", help="checkpoint directory to read")
    convert.add_argument("dst", help="new directory to write (must not exist or be empty); havoc-to-gguf: a new "
                                     ".gguf file")
    convert.add_argument("--tokenizer", help="havoc-to-hf, havoc-to-gguf: the tokenizer to write with the model "
                                             "(default: the one in src)")
    convert.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                         help="havoc-to-gguf: the weights' type in the GGUF file (default: f16; norms stay f32)")
    convert.set_defaults(func=_convert)

    tokenizer = commands.add_parser("tokenizer", help="train and try the byte-level BPE tokenizer")
    tok_commands = tokenizer.add_subparsers(dest="action", required=True)
    train = tok_commands.add_parser("train", help="train a tokenizer (compression is measured on held-out documents)")
    _add_corpus_arguments(train)
    train.add_argument("--vocab-size", type=int, default=70000)
    train.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt")
    train.add_argument("--out", required=True, help="new directory for tokenizer.json and tokenizer_config.json")
    train.set_defaults(func=_tokenizer_train)
    encode = tok_commands.add_parser("encode", help="print the token ids of TEXT")
    encode.add_argument("text", metavar="TEXT", help="the text, or - to read standard input")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    encode.add_argument("--allow-special", action="store_true", help="read <|...|> text as special tokens")
    encode.set_defaults(func=_tokenizer_encode)
    decode = tok_commands.add_parser("decode", help="print the text of token ids")
    decode.add_argument("ids", nargs="+", type=int, metavar="ID")
    decode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    decode.add_argument("--skip-special-tokens", action="store_true")
    decode.set_defaults(func=_tokenizer_decode)

    for name, description in (("train", "pretrain a model (one process, or many under torchrun)"),
                              ("finetune", "supervised fine-tuning on chat JSONL (optionally LoRA)")):
        run = commands.add_parser(name, help=description)
        run.add_argument("config", nargs="?", help="a .toml or .yaml training config; flags below override its keys")
        run.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in out")
        run.add_argument("--overwrite", action="store_true",
                         help="replace the run already in out (its checkpoints and metrics are deleted)")
        run.add_argument("--dry-run", action="store_true",
                         help="print the memory this run needs per process (weights, gradients, optimizer, "
                              "activations) and exit without training")
        add_override_flags(run)
        run.set_defaults(func=_train)

    export = commands.add_parser("export", help="write a training checkpoint as a save_pretrained folder")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/havoc/checkpoints/step-001000")
    export.add_argument("out", help="new folder (config.json, model.safetensors and the tokenizer)")
    export.add_argument("--tokenizer", help="the tokenizer folder, if it has moved since training "
                                            "(default: the one the checkpoint recorded)")
    export.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="dtype of the written weights (default: the run's compute dtype, bf16 for a GPU run)")
    export.set_defaults(func=_export)

    quick = commands.add_parser("quickstart", help="tokenizer, data, a few minutes of training and samples")
    quick.add_argument("--out", default="runs/quickstart", help="new folder for everything it makes")
    quick.add_argument("--max-steps", type=int, default=250)
    quick.set_defaults(func=_quickstart)

    evaluate = commands.add_parser("eval", help="evaluate a model (lm-eval: `lm_eval --model havoc ...`)")
    eval_commands = evaluate.add_subparsers(dest="action", required=True)
    ppl = eval_commands.add_parser("perplexity", help="mean token loss, perplexity and bits-per-byte on text")
    ppl.add_argument("checkpoint", help="a model folder (save_pretrained or `havoc export`)")
    ppl.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files, folders or .jsonl")
    ppl.add_argument("--tokenizer", help="tokenizer folder (default: the one in the checkpoint folder)")
    ppl.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    ppl.add_argument("--context", type=int, help="tokens per window (default: the model's max_seq_len)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: context / 2)")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--device", default="cpu")
    _add_precision_arguments(ppl)
    ppl.add_argument("--json", help="also write the result to this file")
    ppl.set_defaults(func=_eval_perplexity)

    he = eval_commands.add_parser("humaneval", help="HumanEval pass@k, completions executed in a sandbox (offline)")
    he.add_argument("checkpoint", help="a model folder (save_pretrained or `havoc export`)")
    he.add_argument("--tokenizer", help="tokenizer folder (default: the one in the checkpoint folder)")
    he.add_argument("--samples-per-task", type=int, default=1, help="completions per problem (default: 1)")
    he.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); the paper samples at "
                                                                    "0.2 for pass@1 and 0.8 for pass@100")
    he.add_argument("--top-p", type=float, default=0.95)
    he.add_argument("--k", type=int, nargs="+", help="pass@k to report (default: 1, 10, 100 up to the samples)")
    he.add_argument("--limit", type=int, help="only the first N of the 164 problems")
    he.add_argument("--max-tokens", type=int, default=384, help="tokens per completion (at most half the context)")
    he.add_argument("--seed", type=int, default=0, help="problem i, sample j draws from seed + i x samples + j")
    he.add_argument("--slots", type=int, default=16, help="sequences generated together")
    he.add_argument("--timeout", type=float, default=5.0, help="seconds each completion's tests may run")
    he.add_argument("--allow-unsandboxed", action="store_true",
                    help="where namespaces are not available (not root, no unshare): run with limits only")
    he.add_argument("--device", default="cpu")
    _add_precision_arguments(he)
    he.add_argument("--json", help="also write the result, every completion and its outcome, to this file")
    he.set_defaults(func=_eval_humaneval)

    bench = commands.add_parser("bench", help="prefill, decode and training throughput beside HF transformers")
    bench.add_argument("model", nargs="?", default="small", help="a checkpoint folder or a preset (default: small)")
    bench.add_argument("--device", default="cpu")
    _add_precision_arguments(bench)
    bench.add_argument("--prefill-tokens", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--decode-batch", type=int, nargs="+", default=[1], metavar="B",
                       help="batch sizes of the decode benchmark (default: 1)")
    bench.add_argument("--train-batch", type=int, default=4, help="0 skips the training benchmark")
    bench.add_argument("--train-seq", type=int, default=256)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--json", help="also write the results here")
    bench.add_argument("--chart", help="also draw a PNG bar chart here")
    bench.set_defaults(func=_bench)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page")
    serve.add_argument("checkpoint", help="a model folder with its tokenizer (save_pretrained or `havoc export`)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    serve.add_argument("--tokenizer", help="tokenizer folder (default: the one in the checkpoint folder)")
    serve.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    serve.add_argument("--slots", type=int, default=8, help="sequences decoded together")
    serve.add_argument("--context", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    serve.add_argument("--kv-cache-tokens", type=int,
                       help="positions in the paged KV cache, shared by all sequences (default: slots x context; "
                            "on CUDA at most 80%% of the memory free after loading)")
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="recompute every prompt instead of reusing the cached blocks of an equal prefix")
    serve.add_argument("--step-tokens", type=int, default=256,
                       help="positions one engine step computes: one per decoding sequence, the rest for a "
                            "prompt chunk (at least one position; keep it well above --slots)")
    serve.add_argument("--speculate", type=int, default=0, metavar="K",
                       help="speculative decoding: guess up to K tokens a step (by prompt lookup unless --draft) "
                            "and verify them in one forward pass; greedy output is unchanged")
    serve.add_argument("--draft", metavar="MODEL", help="a smaller model folder with the same tokenizer that makes "
                                                        "the guesses (needs --speculate)")
    serve.add_argument("--device", default="cpu")
    _add_precision_arguments(serve)
    serve.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    serve.add_argument("--max-queue", type=int, help="sequences that may wait for a slot; past it, 429 "
                                                     "(default: 4 x slots)")
    serve.add_argument("--max-seqs-per-request", type=int, help="prompts x n one request may ask for (default: slots)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="on SIGTERM, seconds running sequences may take to finish before they are ended")
    serve.set_defaults(func=_serve)

    quantize = commands.add_parser("quantize", help="write a model folder with torchao-quantized weights")
    quantize.add_argument("src", help="a model folder (save_pretrained or `havoc export`)")
    quantize.add_argument("dst", help="new folder (must not exist or be empty)")
    quantize.add_argument("--scheme", required=True, choices=QUANTIZE_CHOICES,
                          help="int8: per output channel; int4: groups of 32 (tinygemm's layout for --device)")
    quantize.add_argument("--device", default="cpu",
                          help="where the folder will run: int4 is packed for that device's kernel (default: cpu)")
    quantize.add_argument("--tokenizer", help="tokenizer folder (default: the one in src)")
    quantize.set_defaults(func=_quantize)

    data = commands.add_parser("data", help="prepare token datasets for training")
    data_commands = data.add_subparsers(dest="action", required=True)
    prepare = data_commands.add_parser("prepare", help="tokenize a corpus into uint32 shards with a manifest")
    _add_corpus_arguments(prepare)
    prepare.add_argument("--tokenizer", required=True, help="tokenizer directory")
    prepare.add_argument("--out", required=True, help="new directory for the dataset")
    prepare.add_argument("--workers", type=int, help="tokenizing processes (default: one per core); the dataset "
                                                     "is byte for byte the same for any number")
    prepare.add_argument("--num-shards", type=int, default=1, metavar="K",
                         help="prepare only part --shard-index of K (contiguous input files, balanced by size), "
                              "one per machine; `havoc data merge` joins the parts")
    prepare.add_argument("--shard-index", type=int, default=0, metavar="I", help="which part, 0 to K-1")
    merge = data_commands.add_parser("merge", help="join the parts of a --num-shards run into one dataset")
    merge.add_argument("parts", nargs="+", help="the part folders (any order)")
    merge.add_argument("--out", required=True, help="new directory for the dataset")
    merge.set_defaults(func=_data_merge)
    prepare.set_defaults(func=_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ModuleNotFoundError as e:
        print(f"havoc {args.command}: error: this needs the optional package {e.name!r}: "
              "pip install 'havoc[eval]' (or 'havoc[dev]')", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ArithmeticError) as e:
        # Expected errors (bad values, missing or unreadable files, a diverged run): one clear line, no traceback.
        print(f"havoc {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
