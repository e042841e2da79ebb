"""The inference engine: a static KV cache of `slots` x context, continuous batching, chunked prefill.

Every running sequence owns a slot: a row of the preallocated cache, written by index. Each
engine step prefills one chunk of one new prompt (so long prompts never stall running streams)
and then decodes one token for every slot at once: a fixed-shape step that `torch.compile` can
capture whole. The cache is made of registered buffers of an engine-owned module, so CUDA-graph
trees replay the compiled step (they skip graphs that mutate inputs other than parameters and
buffers). Sampling stays on the weights' device, with one host transfer per step for all rows.
Sequences join and leave between steps; memory is bounded by slots x context.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer
from havoc_inference.sampling import SamplingParams, choose, process_logits, valid


logger = logging.getLogger(__name__)


class ContextTooLong(ValueError):
    pass


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


class Draining(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class Event:
    """What a sequence reports after a step: new text and tokens, and at the end a finish reason."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "error" (with `error` saying what failed)
    error: str | None = None


@dataclass
class Completion:
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int, device: torch.device,
                 request: list[Sequence]):
        self.id = next(self._ids)
        self.prompt_ids, self.params = prompt_ids, params
        self.request = request  # every sequence of the request this one belongs to (prompts x n)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.output_ids: list[int] = []
        self.counts: dict[int, int] = {}
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.echo and params.logprobs is not None else None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.text = ""  # the output decoded so far (whole characters only)
        self.decoded = self.undecoded = 0  # see _new_text
        self.emitted = 0  # characters of `text` already reported
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None  # set by cancel(): the engine thread ends the sequence with it
        self.events: queue.Queue[Event] = queue.Queue()
        self.notify: Callable[[Event], None] = self.events.put
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None


class _SlotWrite:
    """The engine's StaticCache for one layer: writes the new keys/values into the slot rows."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: int | None, start: int, positions: torch.Tensor):
        self.k, self.v, self.slot, self.start, self.positions = k, v, slot, start, positions

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is None:  # decode: one new position in each of the first rows slots
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, self.positions[:, 0]] = k[:, :, 0]
            self.v[rows, :, self.positions[:, 0]] = v[:, :, 0]
            return self.k[: k.shape[0]], self.v[: k.shape[0]]
        end = self.start + k.shape[2]  # prefill: a chunk of one slot
        self.k[self.slot, :, self.start:end] = k[0]
        self.v[self.slot, :, self.start:end] = v[0]
        return self.k[self.slot : self.slot + 1], self.v[self.slot : self.slot + 1]


class _Decoder(nn.Module):
    """The model and its static KV cache, as buffers (slots x KV heads x context + 1 x head dim per
    layer, in the weights' dtype and on their device). One spare column: slots that are not
    decoding write their throw-away step there."""

    def __init__(self, model: HavocModel, slots: int, context: int):
        super().__init__()
        self.model = model
        config, weight = model.config, model.embed_tokens.weight
        shape = (slots, config.attention.num_kv_heads, context + 1, config.head_dim)
        for i in range(config.num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype), persistent=False)
        self.register_buffer("key_positions", torch.arange(context + 1, device=weight.device), persistent=False)

    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(self.model.config.num_layers)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int | None = None, start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Logits for `tokens` [rows, seq] at `positions`: a prefill chunk of `slot` from `start`, or
        (slot None) one decode token in each of the first rows slots."""
        model = self.model
        x = model.embed_tokens(tokens)
        rope = model.rotary(positions.clamp(max=model.config.max_seq_len - 1))  # the spare column's rope is moot
        mask = (self.key_positions[None, None, :] <= positions[:, :, None])[:, None]
        for layer, (k, v) in zip(model.layers, self.caches()):
            x, _ = layer(x, rope, mask, _SlotWrite(k, v, slot, start, positions))
        return model.lm_head(model.norm(x if all_logits else x[:, -1:]))


RECOMPILE_LIMIT = 256  # graphs of the compiled step: one per batch size and engine

# Up to this many rows the multiply-and-sum form wins; at 16 rows the BLAS call does (578 vs 440 tok/s measured).
ROW_LINEAR_MAX_ROWS = 4


class _RowLinear(TorchFunctionMode):
    """Linear layers over a few rows as multiply-and-sum, for the compiled CPU decode step.

    Inductor turns that into one vectorised pass over each weight matrix; on the project's CPU it
    streams weights at ~26 GB/s where the BLAS matrix-vector call reaches ~11 GB/s, and decode
    is bound by reading the weights (see benchmarks/RESULTS.md).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # Quantized (torchao) weights keep their own kernels.
            if (bias is None and type(weight) in (torch.Tensor, nn.Parameter)
                    and x.numel() // x.shape[-1] <= ROW_LINEAR_MAX_ROWS):
                return (x.unsqueeze(-2) * weight).sum(-1)
        return func(*args, **kwargs)


class Engine:
    def __init__(self, model: HavocModel, tokenizer: HavocTokenizer, slots: int = 8, context: int | None = None,
                 prefill_chunk: int = 256, compile: bool = False, max_queue: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        self.context = context or config.max_seq_len
        if self.context > config.max_seq_len:
            raise ValueError(f"context {self.context} exceeds the model's max_seq_len {config.max_seq_len}")
        self.slots, self.prefill_chunk = slots, prefill_chunk
        self.max_queue = 4 * slots if max_queue is None else max_queue
        self.eos_ids = {*config.eos_token_ids, tokenizer.eos_token_id}
        self.device = model.embed_tokens.weight.device
        self.decoder = _Decoder(model, slots, self.context)
        self.decode_step = self.decoder
        # dynamic=False: each batch size is its own fixed-shape graph, compiled once at warm-up.
        if compile:
            # Engines in one process (other models, dtypes, quantizations) share the step's code
            # object, whose graphs dynamo caps at 8 by default: a fourth 8-slot engine would fail.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if compile and self.device.type == "cuda":
            # CUDA graphs: one recording per batch size at warm-up, then replays.
            self.decode_step = torch.compile(self.decoder, mode="reduce-overhead", fullgraph=True, dynamic=False)
        elif compile:
            self.decode_step = torch.compile(self._decode_step_rows, fullgraph=True, dynamic=False)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = self.draining = False
        self.thread: threading.Thread | None = None
        self._seeds = itertools.count(int(time.time_ns() % 2**31))

    @property
    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (key, value) cache of each layer: [slots, KV heads, context + 1, head dim] each."""
        return self.decoder.caches()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile (and on CUDA record) the decode step for every batch size it will meet, before the
        first request does. Call it from the thread that will step: CUDA-graph trees are per thread."""
        rows = 1
        while True:
            rows = min(rows, self.slots)
            tokens = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
            positions = torch.full((rows, 1), self.context, device=self.device)
            for _ in range(3):  # cudagraph trees record on the second call and replay from the third
                self.decode_step(tokens, positions)
            if rows == self.slots:
                return
            rows *= 2

    # Requests.
    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               notify: Callable[[Sequence, Event], None] | None = None) -> list[Sequence]:
        """Queue `n` sequences for each prompt, as one request: a failure in any of them ends them all.
        Events go to `notify(sequence, event)` or each sequence's queue."""
        vocab = self.model.config.vocab_size
        for prompt_ids in prompts:
            if not prompt_ids:
                raise ValueError("the prompt is empty")
            bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")
            if len(prompt_ids) + params.max_tokens > self.context:
                raise ContextTooLong(
                    f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                    f"{len(prompt_ids) + params.max_tokens} exceeds the context of {self.context} tokens"
                )
        request: list[Sequence] = []
        for prompt_ids in prompts:
            for i in range(n):
                # Same seed, same output, whatever else is running: each sequence draws from its own generator.
                seed = (params.seed + i) % 2**64 if params.seed is not None else next(self._seeds)
                seq = Sequence(list(prompt_ids), params, seed, self.device, request)
                if notify is not None:
                    seq.notify = (lambda s: lambda event: notify(s, event))(seq)
                request.append(seq)
        with self.lock:
            if self.draining:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self.waiting) + len(request) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (the bound is {self.max_queue}); "
                                "retry shortly")
            self.waiting.extend(request)
        self.wakeup.set()
        return request

    def cancel(self, sequences: list[Sequence], reason: str = "cancelled") -> None:
        """End these sequences with `reason` (a final event says so); the engine thread frees their slots."""
        for seq in sequences:
            if seq.finish_reason is None:
                seq.stop_reason = reason
        self.wakeup.set()

    def drain(self, timeout: float) -> None:
        """Take no new requests; after `timeout` seconds end whatever still runs with finish_reason "abort"."""
        with self.lock:
            self.draining = True

        def abort_later() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (self.waiting or self.running):
                time.sleep(0.05)
            with self.lock:
                left = [*self.waiting, *self.running.values()]
            self.cancel(left, "abort")

        threading.Thread(target=abort_later, name="havoc-drain", daemon=True).start()

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Blocking: the completions of one prompt (runs the steps itself if no loop thread is running)."""
        return self.complete([prompt_ids], params, n)

    def complete(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Blocking: n completions of each prompt, prompt-major."""
        return self.collect(self.submit(prompts, params, n))

    def collect(self, sequences: list[Sequence]) -> list[Completion]:
        """Blocking: the completions of submitted sequences (the steps run here if no loop thread does)."""
        while self.thread is None and any(s.finish_reason is None for s in sequences):
            self.step()
        return [self._collect(seq) for seq in sequences]

    def _collect(self, seq: Sequence) -> Completion:
        text, tokens, logprobs = [], [], []
        while True:
            event = seq.events.get()
            text.append(event.text)
            tokens += event.tokens
            logprobs += event.logprobs
            if event.finish_reason is not None:
                return Completion("".join(text), tokens, logprobs, event.finish_reason, seq.prompt_logprobs)

    @property
    def queue_depth(self) -> int:
        with self.lock:
            return len(self.waiting) + sum(1 for s in self.running.values() if s.prefilled < len(s.prompt_ids))

    # The loop.
    def start(self, warm_up: bool = False) -> None:
        """Step in a thread of its own from now on; `warm_up` first compiles every batch size in it
        (this returns when that is done, re-raising what failed)."""
        ready: queue.Queue[Exception | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, args=(ready, warm_up), name="havoc-engine", daemon=True)
        self.thread.start()
        error = ready.get()
        if error is not None:
            self.thread.join()
            raise error

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join()

    def _loop(self, ready: queue.Queue, warm_up: bool) -> None:
        try:
            if warm_up:
                self.warm_up()
        except Exception as e:
            ready.put(e)
            return
        ready.put(None)
        while not self.stopping:
            try:
                busy = self.step()
            except Exception as e:  # a failure no single request can be blamed for: fail what runs
                logger.exception("engine step failed")
                with self.lock:
                    running = list(self.running.values())
                self._fail(running, e)
                continue
            if not busy:
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()

    def _fail(self, sequences: list[Sequence], error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        with self.lock:
            failed = [s for s in sequences if s.finish_reason is None]
            for seq in failed:
                self._finish(seq, "error")
        for seq in failed:
            seq.notify(Event(text="", finish_reason="error", error=message))

    def _guarded(self, seq: Sequence, work: Callable, *args) -> None:
        """Run `work(seq, *args)`; if it fails, fail `seq`'s whole request and no other."""
        try:
            work(seq, *args)
        except Exception as e:
            logger.exception("request of sequence %d failed", seq.id)
            self._fail(seq.request, e)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill one chunk, decode one token everywhere. False when there was nothing to do."""
        with self.lock:
            ended = [s for s in [*self.waiting, *self.running.values()] if s.stop_reason and s.finish_reason is None]
            for seq in ended:
                self._finish(seq, seq.stop_reason)
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)
            free = [s for s in range(self.slots) if s not in self.running]
            while free and self.waiting:
                seq = self.waiting.popleft()
                seq.slot = free.pop(0)
                self.running[seq.slot] = seq
            running = list(self.running.values())
        for seq in ended:
            seq.notify(Event(finish_reason=seq.finish_reason))
        if not running:
            return bool(ended)
        prefilling = [s for s in running if s.prefilled < len(s.prompt_ids)]
        if prefilling:
            seq = min(prefilling, key=lambda s: s.id)
            self._guarded(seq, self._prefill_chunk)
        decoding = [s for s in running if s.prefilled == len(s.prompt_ids) and s.output_ids and s.finish_reason is None]
        if decoding:
            self._decode(decoding)
        return True

    def _decode_step_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with _RowLinear():
            return self.decoder(tokens, positions)

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.prefilled
        chunk = seq.prompt_ids[start : start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        echo = seq.prompt_logprobs is not None
        logits = self.decoder(tokens, positions, seq.slot, start, all_logits=echo)[0].float()
        seq.prefilled += len(chunk)
        if echo:  # log-probabilities of the prompt's own tokens (lm-evaluation-harness scores with these)
            targets = seq.prompt_ids[start + 1 : start + len(chunk) + 1]
            seq.prompt_logprobs += self._logprobs([(logits[i], t, seq.params.logprobs) for i, t in enumerate(targets)])
        if seq.prefilled == len(seq.prompt_ids):
            self._accept([seq], logits[-1:])

    def _decode(self, decoding: list[Sequence]) -> None:
        # Decode the first `rows` slots only: the smallest power of two (capped at slots) that holds
        # every busy slot. Slots are handed out lowest first, so one request decodes as batch 1;
        # each size is one fixed shape, compiled once.
        rows = min(self.slots, 1 << max(s.slot for s in decoding).bit_length())
        tokens = torch.full((rows, 1), self.model.config.pad_token_id, device=self.device)
        positions = torch.full((rows, 1), self.context, device=self.device)  # idle rows: the spare column
        for seq in decoding:
            tokens[seq.slot, 0] = seq.output_ids[-1]
            positions[seq.slot, 0] = len(seq.prompt_ids) + len(seq.output_ids) - 1
        logits = self.decode_step(tokens, positions)[:, 0].float()
        self._accept(decoding, logits[[seq.slot for seq in decoding]])

    def _accept(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Choose the next token of each sequence from its raw logits row [vocab] and report it.

        Processing and drawing stay on the device; the tokens (and whether each row could be
        sampled) come to the host in one transfer for all rows, the log-probabilities in one more.
        A failure ends only the request of the sequence it came from."""
        chosen = []
        for seq, row in zip(sequences, logits):
            if seq.finish_reason is not None:  # a failed neighbour of the same request ended it
                continue
            try:
                processed = process_logits(row.clone(), seq.params, seq.prompt_ids, seq.counts)
                chosen.append((seq, row, torch.stack((choose(processed, seq.params, seq.generator),
                                                      valid(processed, seq.params).long()))))
            except Exception as e:
                logger.exception("request of sequence %d failed", seq.id)
                self._fail(seq.request, e)
        if not chosen:
            return
        picks = torch.stack([pick for _, _, pick in chosen]).tolist()
        accepted = []
        for (seq, row, _), (token, ok) in zip(chosen, picks):
            if seq.finish_reason is not None:
                continue
            if not ok:
                self._fail(seq.request, FloatingPointError(
                    "the next-token probabilities are not finite (NaN or infinite logits): nothing can be sampled"))
                continue
            accepted.append((seq, row, token))
        logprobs = self._logprobs([(row, token, seq.params.logprobs) for seq, row, token in accepted
                                   if seq.params.logprobs is not None])
        for seq, _, token in accepted:
            if seq.finish_reason is None:
                self._guarded(seq, self._report, token, logprobs.pop(0) if seq.params.logprobs is not None else None)

    @staticmethod
    def _logprobs(rows: list[tuple[torch.Tensor, int, int]]) -> list[TokenLogprob]:
        """Of the model's own distribution, as OpenAI reports them: each (logits, token, top k) row's
        token log-probability and its top k alternatives, in one host transfer."""
        if not rows:
            return []
        log_probs = torch.stack([row for row, _, _ in rows]).log_softmax(-1)
        tokens = torch.tensor([token for _, token, _ in rows], device=log_probs.device)
        top = max(k for _, _, k in rows)
        best = torch.topk(log_probs, top) if top else None
        chosen = log_probs.gather(-1, tokens[:, None])[:, 0].tolist()
        values, indices = (best.values.tolist(), best.indices.tolist()) if best is not None else ([], [])
        return [TokenLogprob(token, chosen[i], list(zip(indices[i][:k], values[i][:k])) if k else [])
                for i, (_, token, k) in enumerate(rows)]

    def _report(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record `token` as the next of `seq`, report it, and finish `seq` if it is done."""
        params = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        event = Event(tokens=[token], logprobs=[logprob] if logprob is not None else [])
        stop_token = token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)
        if not stop_token:
            seq.output_ids.append(token)
            seq.counts[token] = seq.counts.get(token, 0) + 1
        searched = max(0, len(seq.text) - max((len(s) for s in params.stop), default=0) + 1)
        seq.text += self._new_text(seq)
        # A stop string may span tokens: search the new text and what precedes it; the earliest wins.
        cut = min((at for at in (seq.text.find(stop, searched) for stop in params.stop) if at != -1), default=None)
        finish = "stop" if stop_token or cut is not None else None
        if finish is None and (len(seq.output_ids) >= params.max_tokens
                               or len(seq.prompt_ids) + len(seq.output_ids) >= self.context):
            finish = "length"
        if cut is not None:
            text = seq.text[:cut]
        elif finish is not None:  # the end: also a character left half-spelt
            seq.text += self._new_text(seq, final=True)
            text = seq.text
        else:  # hold back what may be the start of a stop string
            hold = max((len(s) - 1 for s in params.stop), default=0)
            text = seq.text[:max(len(seq.text) - hold, seq.emitted)]
        event.text = text[seq.emitted:]
        seq.emitted = len(text)
        if finish is not None:
            event.finish_reason = finish
            with self.lock:
                self._finish(seq, finish)
        seq.notify(event)

    def _new_text(self, seq: Sequence, final: bool = False) -> str:
        """The text the output ids added since the last call, decoding only a few recent ids.

        `decoded`..`undecoded` are ids whose text is already in seq.text (kept as context for the
        next piece); a piece ending in U+FFFD is a character still being spelt and waits, unless final.
        """
        ids = seq.output_ids
        before = self.tokenizer.decode(ids[seq.decoded : seq.undecoded], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[seq.decoded :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        seq.decoded, seq.undecoded = seq.undecoded, len(ids)
        return after[len(before):]

    def _finish(self, seq: Sequence, reason: str) -> None:
        # Called with the lock held.
        seq.finish_reason = reason
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
