"""The inference engine: a static KV cache of `slots` x context, continuous batching, chunked prefill.

Every running sequence owns a slot: a row of the preallocated cache, written by index. Each
engine step prefills one chunk of one new prompt (so long prompts never stall running streams)
and then decodes one token for every slot at once: a fixed-shape step that `torch.compile` can
capture whole (with CUDA graphs on a GPU). Sequences join and leave between steps; memory is
bounded by slots x context.
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
from torch.overrides import TorchFunctionMode

from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer
from havoc_inference.sampling import SamplingParams, choose, process_logits


logger = logging.getLogger(__name__)


class ContextTooLong(ValueError):
    pass


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

    def __init__(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                 notify: Callable[[Event], None] | None):
        self.id = next(self._ids)
        self.prompt_ids, self.params = prompt_ids, params
        self.generator = torch.Generator().manual_seed(seed)
        self.output_ids: list[int] = []
        self.counts: dict[int, int] = {}
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.echo and params.logprobs is not None else None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.emitted = 0  # characters of output text already reported
        self.finish_reason: str | None = None
        self.cancelled = False
        self.events: queue.Queue[Event] = queue.Queue()
        self.notify = notify or self.events.put
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None


class _SlotWrite:
    """The engine's StaticCache for one layer: writes the new keys/values into the slot rows."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: int | None, start: int, positions: torch.Tensor):
        self.k, self.v, self.slot, self.start, self.positions = k, v, slot, start, positions

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is None:  # decode: one new position in every slot given
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, self.positions[:, 0]] = k[:, :, 0]
            self.v[rows, :, self.positions[:, 0]] = v[:, :, 0]
            return self.k, self.v
        end = self.start + k.shape[2]  # prefill: a chunk of one slot
        self.k[self.slot, :, self.start:end] = k[0]
        self.v[self.slot, :, self.start:end] = v[0]
        return self.k[self.slot : self.slot + 1], self.v[self.slot : self.slot + 1]


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
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if func is F.linear and bias is None and args[0].numel() // args[0].shape[-1] <= ROW_LINEAR_MAX_ROWS:
            x, weight = args[0], args[1]
            return (x.unsqueeze(-2) * weight).sum(-1)
        return func(*args, **kwargs)


class Engine:
    def __init__(self, model: HavocModel, tokenizer: HavocTokenizer, slots: int = 8, context: int | None = None,
                 prefill_chunk: int = 256, compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        self.context = context or config.max_seq_len
        if self.context > config.max_seq_len:
            raise ValueError(f"context {self.context} exceeds the model's max_seq_len {config.max_seq_len}")
        self.slots, self.prefill_chunk = slots, prefill_chunk
        device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        # One spare column: slots that are not decoding write their throw-away step there.
        shape = (slots, config.attention.num_kv_heads, self.context + 1, config.head_dim)
        self.caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in model.layers]
        self.key_positions = torch.arange(self.context + 1, device=device)
        self.device = device
        self.decode_step = self._decode_step
        if compile and device.type == "cuda":
            self.decode_step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True)  # CUDA graphs
        elif compile:
            self.decode_step = torch.compile(self._decode_step_rows, fullgraph=True)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self._seeds = itertools.count(int(time.time_ns() % 2**31))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the decode step for every batch size it will meet, before the first request does."""
        rows = 1
        while True:
            rows = min(rows, self.slots)
            tokens = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
            positions = torch.full((rows, 1), self.context, device=self.device)
            self.decode_step(tokens, positions, [(k[:rows], v[:rows]) for k, v in self.caches])
            if rows == self.slots:
                return
            rows *= 2

    # Requests.
    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1,
               notify: Callable[[Sequence, Event], None] | None = None) -> list[Sequence]:
        """Queue `n` sequences for one prompt; events go to `notify(sequence, event)` or each sequence's queue."""
        vocab = self.model.config.vocab_size
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
        sequences = []
        for i in range(n):
            # Same seed, same output, whatever else is running: each sequence draws from its own generator.
            seed = params.seed + i if params.seed is not None else next(self._seeds)
            seq = Sequence(list(prompt_ids), params, seed, None)
            if notify is not None:
                seq.notify = (lambda s: lambda event: notify(s, event))(seq)
            sequences.append(seq)
        with self.lock:
            self.waiting.extend(sequences)
        self.wakeup.set()
        return sequences

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop these sequences; their slots are freed at the next step."""
        for seq in sequences:
            seq.cancelled = True
        self.wakeup.set()

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Blocking: the completions of one prompt (runs the steps itself if no loop thread is running)."""
        sequences = self.submit(prompt_ids, params, n)
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
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="havoc-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while not self.stopping:
            try:
                busy = self.step()
            except Exception as e:  # one bad step must not stop the server: fail what it touched
                logger.exception("engine step failed")
                self._fail_running(f"{type(e).__name__}: {e}")
                continue
            if not busy:
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()

    def _fail_running(self, message: str) -> None:
        with self.lock:
            failed = list(self.running.values())
            for seq in failed:
                self._finish(seq, "error")
        for seq in failed:
            seq.notify(Event(text="", finish_reason="error", error=message))

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill one chunk, decode one token everywhere. False when there was nothing to do."""
        with self.lock:
            for seq in list(self.running.values()):
                if seq.cancelled:
                    self._finish(seq, "cancelled")
            free = [s for s in range(self.slots) if s not in self.running]
            while free and self.waiting:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                seq.slot = free.pop(0)
                self.running[seq.slot] = seq
            running = list(self.running.values())
        if not running:
            return False
        prefilling = [s for s in running if s.prefilled < len(s.prompt_ids)]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda s: s.id))
        decoding = [s for s in running if s.prefilled == len(s.prompt_ids) and s.output_ids and s.finish_reason is None]
        if decoding:
            self._decode(decoding)
        return True

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list, slot: int | None, start: int,
                 all_logits: bool) -> torch.Tensor:
        model = self.model
        x = model.embed_tokens(tokens)
        rope = model.rotary(positions.clamp(max=model.config.max_seq_len - 1))  # the spare column's rope is moot
        mask = (self.key_positions[None, None, :] <= positions[:, :, None])[:, None]
        for layer, (k, v) in zip(model.layers, caches):
            x, _ = layer(x, rope, mask, _SlotWrite(k, v, slot, start, positions))
        return model.lm_head(model.norm(x if all_logits else x[:, -1:]))

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list) -> torch.Tensor:
        # The caches come in as arguments: each batch size passes views of its first rows.
        return self._forward(tokens, positions, caches, None, 0, all_logits=False)[:, 0]

    def _decode_step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list) -> torch.Tensor:
        with _RowLinear():
            return self._decode_step(tokens, positions, caches)

    def _prefill_chunk(self, seq: Sequence) -> None:
        start = seq.prefilled
        chunk = seq.prompt_ids[start : start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        echo = seq.prompt_logprobs is not None
        logits = self._forward(tokens, positions, self.caches, seq.slot, start, all_logits=echo)[0].float()
        seq.prefilled += len(chunk)
        if echo:  # log-probabilities of the prompt's own tokens (lm-evaluation-harness scores with these)
            targets = seq.prompt_ids[start + 1 : start + len(chunk) + 1]
            log_probs = logits.log_softmax(-1)
            seq.prompt_logprobs += [self._logprob(log_probs[i], t, seq.params.logprobs) for i, t in enumerate(targets)]
        if seq.prefilled == len(seq.prompt_ids):
            self._accept(seq, logits[-1])

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
        logits = self.decode_step(tokens, positions, [(k[:rows], v[:rows]) for k, v in self.caches]).float()
        for seq in decoding:
            self._accept(seq, logits[seq.slot])

    @staticmethod
    def _logprob(log_probs: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
        best = torch.topk(log_probs, top) if top else None
        alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
        return TokenLogprob(token, float(log_probs[token]), alternatives)

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Choose the next token of `seq` from its raw logits, report it, and finish it if it is done."""
        params = seq.params
        token = choose(process_logits(logits.clone(), params, seq.prompt_ids, seq.counts), params, seq.generator)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        event = Event(tokens=[token])
        if params.logprobs is not None:  # of the model's own distribution, as OpenAI reports them
            event.logprobs.append(self._logprob(logits.log_softmax(-1), token, params.logprobs))
        stop_token = token in params.stop_token_ids or (token == self.tokenizer.eos_token_id and not params.ignore_eos)
        if not stop_token:
            seq.output_ids.append(token)
            seq.counts[token] = seq.counts.get(token, 0) + 1
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        finish = "stop" if stop_token else None
        for stop in params.stop:  # a stop string may span tokens: search the new text and what precedes it
            at = text.find(stop, max(0, seq.emitted - len(stop) + 1))
            if at != -1:
                text, finish = text[:at], "stop"
        if finish is None and (len(seq.output_ids) >= params.max_tokens
                               or len(seq.prompt_ids) + len(seq.output_ids) >= self.context):
            finish = "length"
        if finish is None:
            # Hold back what may be the start of a stop string or of a character still being spelt.
            hold = max((len(s) - 1 for s in params.stop), default=0)
            safe = len(text) - hold
            while safe > seq.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            text = text[:max(safe, seq.emitted)]
        event.text = text[seq.emitted:]
        seq.emitted = len(text)
        if finish is not None:
            event.finish_reason = finish
            with self.lock:
                self._finish(seq, finish)
        seq.notify(event)

    def _finish(self, seq: Sequence, reason: str) -> None:
        # Called with the lock held.
        seq.finish_reason = reason
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
