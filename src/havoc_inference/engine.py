"""The inference engine: a paged KV cache, prefix caching, continuous batching, chunked prefill.

The cache is one pool of fixed-size blocks per layer, sized by a token budget; each sequence holds
a table of the blocks its positions live in, and attention reads through it (a gather of the live
blocks only). With prefix caching a sequence starts from the longest run of full blocks another
sequence already computed for the same tokens (see kv_cache.py). When the pool runs out, the newest
sequence is preempted: its blocks are freed and it is recomputed later, to the same output.

Each engine step prefills one chunk of one prompt (so long prompts never stall running streams)
and then decodes one token for every sequence at once: a step of fixed batch size that
`torch.compile` captures whole. The pool is made of registered buffers of an engine-owned module,
so CUDA-graph trees replay the compiled step (they skip graphs that mutate inputs other than
parameters and buffers). Sampling runs for all rows together on the weights' device, with one host
transfer per step. Sequences join and leave between steps.

With speculation (speculate K > 0) each decoding row also carries up to K guessed tokens, from
prompt lookup or a draft model (see speculative.py), and the step verifies them all; a row keeps
the guesses the model accepts and one token more. Rows under a grammar (structured.py) have the
tokens it forbids masked before sampling.
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
from havoc_inference.kv_cache import BlockPool, block_name
from havoc_inference.sampling import SamplingParams, choose, process
from havoc_inference.speculative import PromptLookup, accept
from havoc_inference.structured import Grammars


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
        self.id = next(self._ids)  # arrival order: under memory pressure the newest is preempted
        self.prompt_ids, self.params = prompt_ids, params
        self.request = request  # every sequence of the request this one belongs to (prompts x n)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.matcher = None  # an llguidance matcher of params.grammar, if the output is constrained
        self.output_ids: list[int] = []
        self.ids = list(prompt_ids)  # prompt and output: position i of the cache holds ids[i]
        self.prompt_vocab = set(prompt_ids)  # for the repetition penalty
        self.counts: dict[int, int] = {}
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.echo and params.logprobs is not None else None
        self.slot: int | None = None  # its row of the decode step while it runs
        self.blocks: list[int] = []  # its block table: the pool's blocks holding positions 0, 16, 32, ...
        self.names: list[bytes] = []  # the prefix names of its full blocks (prefix caching)
        self.computed = 0  # positions whose keys and values are in the cache
        self.draft_computed = 0  # the same for the draft model's cache (speculative decoding)
        self.lookup = PromptLookup()  # its n-gram index, for prompt-lookup speculation
        self.text = ""  # the output decoded so far (whole characters only)
        self.decoded = self.undecoded = 0  # see _new_text
        self.emitted = 0  # characters of `text` already reported
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None  # set by cancel(): the engine thread ends the sequence with it
        self.events: queue.Queue[Event] = queue.Queue()
        self.notify: Callable[[Event], None] = self.events.put
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        # The last id goes through the decode step, which gives the logits of the next one.
        return self.computed < len(self.ids) - 1


class _PagedWrite:
    """The engine's cache for one layer (the model's KVCache protocol): writes the new keys and
    values into the pool at the rows' positions, and returns each row's blocks gathered in order."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, index: torch.Tensor):
        self.k, self.v, self.tables, self.index = k, v, tables, index  # index: each new position's place in the pool

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [rows, kv heads, seq, head dim]; the pool: [blocks, block size, kv heads, head dim].
        for pool, new in ((self.k, k), (self.v, v)):
            pool.view(-1, *pool.shape[2:])[self.index] = new.transpose(1, 2).flatten(0, 1)
        rows, blocks = self.tables.shape
        return tuple(pool[self.tables].view(rows, blocks * pool.shape[1], *pool.shape[2:]).transpose(1, 2)
                     for pool in (self.k, self.v))


class _Decoder(nn.Module):
    """The model and its paged KV cache, as buffers: a pool of blocks x block size x KV heads x
    head dim per layer, in the weights' dtype and on their device. One spare block at the end:
    rows that are not decoding write their throw-away step there."""

    def __init__(self, model: HavocModel, num_blocks: int, block_size: int, max_blocks: int):
        super().__init__()
        self.model, self.block_size, self.spare = model, block_size, num_blocks
        config, weight = model.config, model.embed_tokens.weight
        shape = (num_blocks + 1, block_size, config.attention.num_kv_heads, config.head_dim)
        for i in range(config.num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, device=weight.device, dtype=weight.dtype), persistent=False)
        # The positions of the widest block table: one sequence's whole context.
        self.register_buffer("key_positions", torch.arange(max_blocks * block_size, device=weight.device),
                             persistent=False)

    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(self.model.config.num_layers)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                all_logits: bool = True) -> torch.Tensor:
        """Logits for `tokens` [rows, seq] at `positions` (or at the last only), each row reading
        and writing the cache through its block table [rows, blocks]: a prefill chunk of one
        sequence, one decode token in each row, or a row's last token and its guesses (speculative
        decoding). Position -1 is padding: computed as position 0, written to the spare block."""
        model = self.model
        size = self.block_size
        padding = positions < 0
        positions = positions.clamp(min=0)
        x = model.embed_tokens(tokens)
        rope = model.rotary(positions)
        index = tables.gather(1, positions // size) * size + positions % size  # where each new position goes
        index = torch.where(padding, self.spare * size, index)
        keys = self.key_positions[: tables.shape[1] * size]
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
        for layer, (k, v) in zip(model.layers, self.caches()):
            x, _ = layer(x, rope, mask, _PagedWrite(k, v, tables, index.flatten()))
        return model.lm_head(model.norm(x if all_logits else x[:, -1:]))


RECOMPILE_LIMIT = 256  # graphs of the compiled step: one per batch size and engine
MAX_SPECULATE = 15  # guesses per step: 16 positions per row at most

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


BLOCK_SIZE = 16  # positions per cache block (vLLM's default)
KV_MEMORY_FRACTION = 0.8  # on CUDA, of the memory free once the weights are loaded


def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


class Engine:
    def __init__(self, model: HavocModel, tokenizer: HavocTokenizer, slots: int = 8, context: int | None = None,
                 step_tokens: int = 256, compile: bool = False, max_queue: int | None = None,
                 kv_cache_tokens: int | None = None, prefix_caching: bool = True, speculate: int = 0,
                 draft: HavocModel | None = None):
        """`slots` sequences run at once, each of at most `context` positions, in a pool of
        `kv_cache_tokens` positions (default: slots x context on the CPU; on CUDA, what fits in
        KV_MEMORY_FRACTION of free memory, up to that). A step computes about `step_tokens`
        positions: one per decoding sequence, the rest (at least one) for a prefill chunk.
        `speculate` K > 0 guesses up to K tokens per sequence and step, by prompt lookup or with
        the `draft` model (same tokenizer), and verifies them in one forward pass."""
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        self.context = context or config.max_seq_len
        if self.context > config.max_seq_len:
            raise ValueError(f"context {self.context} exceeds the model's max_seq_len {config.max_seq_len}")
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be at least 1, got {step_tokens}")
        if not 0 <= speculate <= MAX_SPECULATE:
            raise ValueError(f"speculate must be between 0 and {MAX_SPECULATE} tokens, got {speculate}")
        if draft is not None and not speculate:
            raise ValueError("a draft model needs speculate K > 0: the tokens it guesses per step")
        if draft is not None and draft.config.vocab_size != config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) is not the target's "
                             f"({config.vocab_size}): it must use the same tokenizer")
        if draft is not None and draft.config.max_seq_len < self.context:
            raise ValueError(f"the draft model's max_seq_len ({draft.config.max_seq_len}) is shorter than the "
                             f"context ({self.context}): give a smaller context or a draft with a longer one")
        self.speculate = speculate
        self.slots, self.step_tokens = slots, step_tokens
        self.max_queue = 4 * slots if max_queue is None else max_queue
        self.eos_ids = {*config.eos_token_ids, tokenizer.eos_token_id}
        self.device = model.embed_tokens.weight.device
        self.grammars = Grammars(tokenizer, config.vocab_size)
        if kv_cache_tokens is None:
            kv_cache_tokens = self._default_cache_tokens()
        if kv_cache_tokens < BLOCK_SIZE:
            raise ValueError(f"kv_cache_tokens must be at least one block ({BLOCK_SIZE} positions), got {kv_cache_tokens}")
        self.pool = BlockPool(kv_cache_tokens // BLOCK_SIZE, BLOCK_SIZE, prefix_caching)
        self.max_blocks = self.pool.blocks_for(self.context)  # one sequence's block table, at most
        self.decoder = _Decoder(model, self.pool.num_blocks, BLOCK_SIZE, self.max_blocks)
        self.decode_step = self.decoder
        # The draft model's cache: a pool of its own, read and written through the target's block tables.
        self.draft = None
        if draft is not None:
            weight = model.embed_tokens.weight
            self.draft = _Decoder(draft.to(device=weight.device, dtype=weight.dtype).eval(), self.pool.num_blocks,
                                  BLOCK_SIZE, self.max_blocks)
        self.draft_step = self._draft_last
        if compile and draft is not None:
            # Its batch (the guessing rows) and catch-up length vary: dynamo makes those sizes dynamic.
            self.draft_step = torch.compile(self._draft_last if self.device.type == "cuda" else self._draft_rows,
                                            fullgraph=True)
        # For /metrics: prompt positions looked up in the prefix cache and found there, positions
        # computed by prefill chunks, sequences preempted, and guessed tokens proposed and accepted.
        self.prefix_queries = self.prefix_hits = self.prefill_tokens = self.preemptions = 0
        self.draft_tokens = self.accepted_tokens = 0
        # dynamic=False: each batch size is its own graph, compiled once at warm-up; only the block
        # tables' width is marked dynamic (see _run_decode).
        if compile:
            # Engines in one process (other models, dtypes, quantizations) share the step's code
            # object, whose graphs dynamo caps at 8 by default: a fourth 8-slot engine would fail.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if compile and self.device.type == "cuda":
            # CUDA graphs: one recording per batch size and table width at warm-up, then replays.
            self.decode_step = torch.compile(self.decoder, mode="reduce-overhead", fullgraph=True, dynamic=False)
        elif compile:
            self.decode_step = torch.compile(self._decode_step_rows, fullgraph=True, dynamic=False)
        self.compiled = compile
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.stopping = self.draining = False
        self.thread: threading.Thread | None = None
        self._seeds = itertools.count(int(time.time_ns() % 2**31))

    def _default_cache_tokens(self) -> int:
        most = self.slots * self.context  # every slot full: more only keeps more prefixes
        if self.device.type != "cuda":
            return most
        config, weight = self.model.config, self.model.embed_tokens.weight
        per_position = 2 * config.num_layers * config.attention.num_kv_heads * config.head_dim * weight.element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(most, int(free * KV_MEMORY_FRACTION) // per_position)

    @property
    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (key, value) pool of each layer: [blocks + 1 spare, block size, KV heads, head dim] each."""
        return self.decoder.caches()

    @property
    def kv_cache_tokens(self) -> int:
        return self.pool.num_blocks * BLOCK_SIZE

    @property
    def max_model_len(self) -> int:
        """The most positions one sequence may have: the context, or the whole pool if that is smaller."""
        return min(self.context, self.kv_cache_tokens)

    def _width(self, blocks: int) -> int:
        # Block tables are padded to a power of two: attention reads the live part of the cache, in
        # few shapes (CUDA graphs are recorded per shape). At least 2: dynamo specialises a size of 1.
        return min(self.max_blocks, max(2, 1 << (blocks - 1).bit_length()))

    def _run_decode(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Logits [rows, columns, vocab]: a row's one decode token, or its last token and guesses."""
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        return self.decode_step(tokens, positions, tables)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile (and on CUDA record) the decode step for every batch size it will meet, before the
        first request does. Call it from the thread that will step: CUDA-graph trees are per thread."""
        widths = [self.max_blocks]
        if self.device.type == "cuda":  # a graph per width; on the CPU the width is dynamic
            widths = sorted({self._width(1 << i) for i in range(self.max_blocks.bit_length() + 1)})
        rows = 1
        while True:
            rows = min(rows, self.slots)
            for width, columns in itertools.product(widths, sorted({1, 1 + self.speculate})):
                tokens = torch.zeros((rows, columns), dtype=torch.long, device=self.device)
                positions = torch.zeros((rows, columns), dtype=torch.long, device=self.device)
                tables = torch.full((rows, width), self.pool.num_blocks, device=self.device)
                for _ in range(3):  # cudagraph trees record on the second call and replay from the third
                    self._run_decode(tokens, positions, tables)
            if rows == self.slots:
                break
            rows *= 2
        if self.draft is not None and self.compiled:  # two sizes of each dimension: dynamo then makes them dynamic
            for rows, length in itertools.product(sorted({1, min(2, self.slots)}), (1, 2)):
                tables = torch.full((rows, self.max_blocks), self.pool.num_blocks, device=self.device)
                zeros = torch.zeros((rows, length), dtype=torch.long, device=self.device)
                self._run_draft(zeros, zeros, tables)

    # Requests.
    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               notify: Callable[[Sequence, Event], None] | None = None) -> list[Sequence]:
        """Queue `n` sequences for each prompt, as one request: a failure in any of them ends them all.
        Events go to `notify(sequence, event)` or each sequence's queue. A grammar that does not
        compile raises InvalidConstraint, saying why."""
        vocab = self.model.config.vocab_size
        for prompt_ids in prompts:
            if not prompt_ids:
                raise ValueError("the prompt is empty")
            bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")
            total = len(prompt_ids) + params.max_tokens
            if total > self.context:
                raise ContextTooLong(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                     f"{total} exceeds the context of {self.context} tokens")
            if total > self.kv_cache_tokens:
                raise ContextTooLong(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                     f"{total} exceeds the whole KV cache of {self.kv_cache_tokens} tokens "
                                     "(--kv-cache-tokens)")
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        request: list[Sequence] = []
        for prompt_ids in prompts:
            for i in range(n):
                # Same seed, same output, whatever else is running: each sequence draws from its own generator.
                seed = (params.seed + i) % 2**64 if params.seed is not None else next(self._seeds)
                seq = Sequence(list(prompt_ids), params, seed, self.device, request)
                seq.matcher = matcher.deep_copy() if matcher is not None else None
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
        """End these sequences with `reason` (a final event says so); the engine thread frees their blocks."""
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
            return len(self.waiting) + sum(1 for s in self.running.values() if s.prefilling)

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the pool's blocks that running sequences hold."""
        return 1 - self.pool.available / self.pool.num_blocks

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
            self._admit()
            running = list(self.running.values())
        for seq in ended:
            seq.notify(Event(finish_reason=seq.finish_reason))
        if not running:
            return bool(ended)
        prefilling = [s for s in running if s.prefilling]
        if prefilling:
            seq = min(prefilling, key=lambda s: s.id)
            # What the decoding rows leave of the step, but at least one position: new prompts always move on.
            chunk = max(1, self.step_tokens - (len(running) - len(prefilling)))
            self._guarded(seq, self._prefill_chunk, chunk)
        decoding = self._make_room([s for s in self.running.values() if not s.prefilling])
        if decoding:
            self._decode(decoding)
        return True

    def _admit(self) -> None:
        """Give free slots to waiting sequences, first come first served, while the pool holds their
        prompts (less what the prefix cache already has). Called with the lock held."""
        free = [s for s in range(self.slots) if s not in self.running]
        while free and self.waiting:
            seq = self.waiting[0]
            # Prompt log-probabilities need every position's logits: those are computed, never reused.
            most = (len(seq.ids) - 1) // BLOCK_SIZE if seq.prompt_logprobs is None else 0
            blocks, names = self.pool.lookup(seq.ids, most)
            if self.pool.available < self.pool.blocks_for(len(seq.ids)) - len(blocks):
                self.pool.release(blocks)
                return
            self.waiting.popleft()
            seq.blocks, seq.names, seq.computed = blocks, names, len(blocks) * BLOCK_SIZE
            seq.draft_computed = seq.computed  # the draft's keys and values are in the same blocks of its pool
            self.prefix_queries += len(seq.ids)
            self.prefix_hits += seq.computed
            seq.slot = free.pop(0)
            self.running[seq.slot] = seq

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and send it back to the head of the queue: it is recomputed from its
        prompt and output so far (and its sampling state), so its output does not change."""
        with self.lock:
            del self.running[seq.slot]
            self.pool.release(seq.blocks)
            seq.slot, seq.blocks, seq.names, seq.computed, seq.draft_computed = None, [], [], 0, 0
            self.waiting.appendleft(seq)
        self.preemptions += 1
        logger.info("KV cache full: sequence %d preempted at %d positions", seq.id, len(seq.ids))

    def _room(self, seq: Sequence, blocks: int) -> bool:
        """Make `blocks` more blocks available for `seq`, preempting the newest sequences as needed
        (perhaps `seq` itself: then False)."""
        while self.pool.available < blocks:
            victim = max(self.running.values(), key=lambda s: s.id)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _make_room(self, decoding: list[Sequence]) -> list[Sequence]:
        """Give each decoding sequence, oldest first, a block for its next position if it needs one."""
        for seq in sorted(decoding, key=lambda s: s.id):
            if seq.slot is not None and len(seq.blocks) * BLOCK_SIZE < len(seq.ids) and self._room(seq, 1):
                seq.blocks.append(self.pool.allocate())
        return [s for s in decoding if s.slot is not None]

    def _name_blocks(self, seq: Sequence) -> None:
        """Name the blocks `seq` has filled since the last call, so that later sequences may reuse them."""
        if not self.pool.prefix_caching:
            return
        while len(seq.names) < seq.computed // BLOCK_SIZE:
            i = len(seq.names)
            seq.names.append(block_name(seq.names[-1] if seq.names else b"",
                                        seq.ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]))
            self.pool.name(seq.blocks[i], seq.names[-1])

    def _draft_last(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.draft(tokens, positions, tables, all_logits=False)

    def _draft_rows(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        with _RowLinear():
            return self._draft_last(tokens, positions, tables)

    def _run_draft(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """The draft's logits [rows, vocab] after the last of `tokens` [rows, seq]."""
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        return self.draft_step(tokens, positions, tables)[:, -1].float()

    def _decode_step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        with _RowLinear():
            return self.decoder(tokens, positions, tables)

    def _prefill_chunk(self, seq: Sequence, size: int) -> None:
        start = seq.computed
        end = min(len(seq.ids) - 1, start + size)
        blocks = self.pool.blocks_for(end)
        if not self._room(seq, blocks - len(seq.blocks)):
            return
        seq.blocks += [self.pool.allocate() for _ in range(blocks - len(seq.blocks))]
        tokens = torch.tensor([seq.ids[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        tables = torch.tensor([seq.blocks[:blocks]], device=self.device)
        echo = seq.prompt_logprobs is not None
        logits = self.decoder(tokens, positions, tables, all_logits=echo)[0].float()
        if self.draft is not None and seq.draft_computed == start:
            self.draft(tokens, positions, tables, all_logits=False)
            seq.draft_computed = end
        seq.computed = end
        self.prefill_tokens += end - start
        self._name_blocks(seq)
        if echo:  # log-probabilities of the prompt's own tokens (lm-evaluation-harness scores with these)
            # Position p's token is scored by the logits at p - 1; after a preemption some already are.
            due = range(max(len(seq.prompt_logprobs), start + 1), min(end + 1, len(seq.prompt_ids)))
            seq.prompt_logprobs += self._logprobs([(logits[p - 1 - start], seq.prompt_ids[p], seq.params.logprobs)
                                                   for p in due])

    def _decode(self, decoding: list[Sequence]) -> None:
        # Decode the first `rows` slots only: the smallest power of two (capped at slots) that holds
        # every busy slot. Slots are handed out lowest first, so one request decodes as batch 1;
        # each size is one fixed shape, compiled once. Idle rows write to the spare block.
        # With speculation each row has 1 + K columns: its last token and its guesses, then padding.
        rows = min(self.slots, 1 << max(s.slot for s in decoding).bit_length())
        guesses, draft_probs = self._guess(decoding) if self.speculate else ([[] for _ in decoding], None)
        columns = 1 + self.speculate if any(guesses) else 1
        width = self._width(max(len(s.blocks) for s in decoding))
        tokens = [[self.model.config.pad_token_id] * columns for _ in range(rows)]
        positions = [[-1] * columns for _ in range(rows)]
        tables = [[self.pool.num_blocks] * width for _ in range(rows)]
        for seq, guess in zip(decoding, guesses):
            tokens[seq.slot][: 1 + len(guess)] = [seq.ids[-1], *guess]
            positions[seq.slot][: 1 + len(guess)] = range(len(seq.ids) - 1, len(seq.ids) + len(guess))
            tables[seq.slot][: len(seq.blocks)] = seq.blocks
        logits = self._run_decode(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                                  torch.tensor(tables, device=self.device))
        self._accept(decoding, logits[[seq.slot for seq in decoding]].float(), guesses, draft_probs)

    def _budget(self, seq: Sequence) -> int:
        """How many tokens to guess for `seq` this step, with blocks for them (none are preempted for this)."""
        if seq.matcher is not None:  # a guess would need the grammar's word too: constrained rows do not guess
            return 0
        # A step gives the accepted guesses and one token more, within max_tokens and the context.
        k = min(self.speculate, seq.params.max_tokens - len(seq.output_ids) - 1, self.context - len(seq.ids) - 1)
        if k <= 0:
            return 0
        need = self.pool.blocks_for(len(seq.ids) + k) - len(seq.blocks)
        if need > self.pool.available:
            return max(0, min(k, len(seq.blocks) * BLOCK_SIZE - len(seq.ids)))
        seq.blocks += [self.pool.allocate() for _ in range(need)]
        return k

    def _guess(self, decoding: list[Sequence]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Each sequence's guesses, and with a draft model the distributions they were drawn from."""
        budgets = [self._budget(seq) for seq in decoding]
        if self.draft is None:
            return [seq.lookup.propose(seq.ids, k) if k else [] for seq, k in zip(decoding, budgets)], None
        return self._draft_guesses(decoding, budgets)

    def _draft_guesses(self, decoding: list[Sequence],
                       budgets: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """Run the draft model over what it has not seen of each guessing row, then once per guess.

        Its cache is read and written through the rows' block tables; rows that have no more to
        guess are padding (position -1). Guesses are drawn as the row's own tokens would be (its
        sampling parameters, its generator), and their distributions are kept for acceptance,
        unless every row is greedy: acceptance then compares argmaxes and needs none."""
        guesses: list[list[int]] = [[] for _ in decoding]
        chosen = [i for i, k in enumerate(budgets) if k]
        if not chosen:
            return guesses, None
        seqs = [decoding[i] for i in chosen]
        pad = self.model.config.pad_token_id
        pending = [seq.ids[seq.draft_computed :] for seq in seqs]
        longest = max(map(len, pending))
        width = self._width(max(len(seq.blocks) for seq in seqs))
        tables = torch.tensor([seq.blocks + [self.pool.num_blocks] * (width - len(seq.blocks)) for seq in seqs],
                              device=self.device)
        tokens = [[pad] * (longest - len(p)) + p for p in pending]
        positions = [[-1] * (longest - len(p)) + list(range(seq.draft_computed, len(seq.ids)))
                     for seq, p in zip(seqs, pending)]
        logits = self._run_draft(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                                 tables)
        for seq in seqs:
            seq.draft_computed = len(seq.ids)
        params = [seq.params for seq in seqs]
        greedy = all(p.greedy for p in params)  # rows that guess nothing never read their q
        draft_probs = None if greedy else torch.zeros((len(decoding), self.speculate, self.model.config.vocab_size),
                                                      device=self.device)
        for j in range(max(budgets)):
            processed = process(logits, params, [(seq.prompt_vocab, seq.counts) for seq in seqs])
            if greedy:
                drawn = processed.argmax(-1)
            else:
                draft_probs[chosen, j] = processed.softmax(-1)
                drawn = choose(processed, params, [seq.generator for seq in seqs])[0]
            for i, token in zip(chosen, drawn.tolist()):
                if j < budgets[i]:
                    guesses[i].append(token)
            going = [j + 1 < budgets[i] for i in chosen]
            if not any(going):
                break
            positions = torch.tensor([[len(seq.ids) + j if go else -1] for seq, go in zip(seqs, going)],
                                     device=self.device)
            logits = self._run_draft(drawn[:, None], positions, tables)
            for seq, go in zip(seqs, going):
                seq.draft_computed += go
        return guesses, draft_probs

    def _choose(self, sequences: list[Sequence], logits: torch.Tensor, guesses: list[list[int]],
                draft_probs: torch.Tensor | None) -> torch.Tensor:
        """[3, rows]: each row's count of accepted guesses, the token it continues with, and whether
        it could be sampled at all. logits: raw, [rows, columns, vocab]."""
        params = [s.params for s in sequences]
        logits = logits.clone()
        constrained = [i for i, s in enumerate(sequences) if s.matcher is not None]
        if constrained:  # only these rows are masked (they never guess); the others are left exactly as they were
            bitmask = self.grammars.masks([sequences[i].matcher for i in constrained],
                                          [[*self.eos_ids, *sequences[i].params.stop_token_ids] for i in constrained])
            rows = logits[constrained, 0]
            self.grammars.apply(rows, bitmask)
            logits[constrained, 0] = rows
        columns = logits.shape[1]
        if columns == 1:
            token, ok = choose(process(logits[:, 0], params, [(s.prompt_vocab, s.counts) for s in sequences]),
                               params, [s.generator for s in sequences])
            return torch.stack((torch.zeros_like(token), token, ok))
        # Every column is processed with the history it follows: the output so far and the guesses before it.
        histories = []
        for seq, guess in zip(sequences, guesses):
            counts = seq.counts
            for j in range(columns):
                histories.append((seq.prompt_vocab, counts))
                if j < len(guess) and _penalised(seq.params):
                    counts = {**counts, guess[j]: counts.get(guess[j], 0) + 1}
        processed = process(logits.flatten(0, 1), [p for p in params for _ in range(columns)], histories)
        processed = processed.reshape(logits.shape)
        k, device = columns - 1, logits.device
        drafts = torch.tensor([g + [0] * (k - len(g)) for g in guesses], device=device)
        counts = torch.tensor([len(g) for g in guesses], device=device)
        greedy = torch.tensor([p.greedy for p in params], device=device)
        noise = torch.full((len(sequences), k + logits.shape[-1]), 0.5, device=device)
        for row, (p, seq) in enumerate(zip(params, sequences)):
            if not p.greedy:
                noise[row].uniform_(generator=seq.generator)
        accepted, token = accept(processed, drafts, counts, greedy, draft_probs, noise)
        finite = ~processed.isnan().any(-1) & (processed.amax(-1) > float("-inf"))
        return torch.stack((accepted, token, (greedy | finite.all(-1)).long()))

    def _accept(self, sequences: list[Sequence], logits: torch.Tensor, guesses: list[list[int]],
                draft_probs: torch.Tensor | None = None) -> None:
        """Choose what each sequence goes on with, from its raw logits [columns, vocab]: the guesses
        accepted and one token more (just that token when it guessed nothing), and report them.

        All rows are processed and drawn together on the device; the tokens (and whether each row
        could be sampled) come to the host in one transfer, the log-probabilities in one more.
        A failure ends only the request of the sequence it came from."""
        try:
            picks = self._choose(sequences, logits, guesses, draft_probs).T.tolist()
        except Exception:  # find whose request failed: each row on its own (a transfer each, only here)
            picks = []
            for i, seq in enumerate(sequences):
                try:
                    picks.append(self._choose([seq], logits[i : i + 1], guesses[i : i + 1],
                                              None if draft_probs is None else draft_probs[i : i + 1])[:, 0].tolist())
                except Exception as e:
                    logger.exception("request of sequence %d failed", seq.id)
                    self._fail(seq.request, e)
                    picks.append(None)
        accepted = []
        for seq, rows, guess, pick in zip(sequences, logits, guesses, picks):
            if pick is None or seq.finish_reason is not None:  # a failed neighbour of the same request ended it
                continue
            taken, token, ok = pick
            if not ok:
                self._fail(seq.request, FloatingPointError(
                    "the next-token probabilities are not finite (NaN or infinite logits): nothing can be sampled"))
                continue
            self.draft_tokens += len(guess)
            self.accepted_tokens += taken
            accepted.append((seq, rows, [*guess[:taken], token]))
        logprobs = self._logprobs([(rows[j], token, seq.params.logprobs) for seq, rows, tokens in accepted
                                   if seq.params.logprobs is not None for j, token in enumerate(tokens)])
        for seq, _, tokens in accepted:
            for token in tokens:
                if seq.finish_reason is None:
                    self._guarded(seq, self._report, token, logprobs.pop(0) if seq.params.logprobs is not None else None)
                elif seq.params.logprobs is not None:
                    logprobs.pop(0)
            if seq.finish_reason is None:
                # The cache now holds the last token and the accepted guesses; what follows them is
                # stale (refused guesses), to be overwritten.
                seq.computed = len(seq.ids) - 1
                seq.draft_computed = min(seq.draft_computed, seq.computed)
                self._name_blocks(seq)

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
            seq.ids.append(token)
            seq.counts[token] = seq.counts.get(token, 0) + 1
        if seq.matcher is not None and not stop_token and not seq.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: {seq.matcher.get_error()}")
        searched = max(0, len(seq.text) - max((len(s) for s in params.stop), default=0) + 1)
        seq.text += self._new_text(seq)
        # A stop string may span tokens: search the new text and what precedes it; the earliest wins.
        cut = min((at for at in (seq.text.find(stop, searched) for stop in params.stop) if at != -1), default=None)
        # A grammar that is complete and allows nothing more (with ignore_eos, eos was taken) stops too.
        finish = "stop" if stop_token or cut is not None or (seq.matcher is not None and seq.matcher.is_stopped()) else None
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
        self.pool.release(seq.blocks)
        seq.blocks = []
