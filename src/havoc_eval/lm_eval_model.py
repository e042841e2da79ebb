"""The lm-evaluation-harness model `havoc`: loglikelihood, loglikelihood_rolling and generate_until,
computed directly on a HavocModel (batched, longest first).

    lm_eval --model havoc --model_args pretrained=DIR --tasks havoc_python_mc --include_path ...
"""

from __future__ import annotations

import warnings

import torch
import lm_eval.models  # noqa: F401  (lm-eval fills its registry with its own models only while it is empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from havoc_core.pretrained import load_model_and_tokenizer
from havoc_eval.perplexity import document_windows
from havoc_eval.scoring import generation_prompt, rolling_windows, score
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams


@register_model("havoc")
class HavocLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu", dtype: str | None = None,
                 quantize: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, stride: int | None = None,
                 seed: int = 1234, **kwargs):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device:  # lm_eval's own default is cuda, also on machines without one
                warnings.warn(f"device {device!r} is not available; evaluating on the CPU", stacklevel=2)
            device = "cpu"
        # dtype: bfloat16 on cuda and float32 on the cpu unless `--model_args dtype=...` says otherwise;
        # `quantize=int8|int4`: torchao weight-only, as `havoc serve --quantize`.
        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, tokenizer, device=device, dtype=dtype,
                                                              quantize=quantize)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" falls back to 8
        self.max_length = int(max_length or self.model.config.max_seq_len)
        # The same windows as `havoc eval perplexity` by default, so the two agree on the same text.
        self.stride = int(stride or self.max_length // 2)
        self.seed = int(seed)  # sampled generations: request i draws from seed + i, so runs repeat

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation, as in lm-eval's HF model:
        # byte-level BPE attaches a space to the word after it.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        return [self.tokenizer.bos_token_id, *context_ids], whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows, owners = [], []
        for i, request in enumerate(requests):
            context_ids, continuation_ids = self._encode_pair(*request.args)
            for window in self._continuation_windows(context_ids + continuation_ids, len(continuation_ids)):
                windows.append(window)
                owners.append(i)
        results = [[0.0, True] for _ in requests]  # an empty continuation: log 1, trivially greedy
        with tqdm(total=len(windows), disable=disable_tqdm, desc="loglikelihood") as bar:
            for i, (log_prob, greedy, _) in zip(owners, score(self.model, windows, self.batch_size, bar)):
                results[i][0] += log_prob
                results[i][1] &= greedy
        return [(log_prob, greedy) for log_prob, greedy in results]

    def _continuation_windows(self, tokens: list[int], n: int) -> list[tuple[list[int], int]]:
        """Windows of at most max_length + 1 tokens that score the last n tokens once each. When the
        continuation fits, one window keeps the end (the context is cut from the left, as in lm-eval's
        HF model); a longer continuation goes through the rolling windows of `loglikelihood_rolling`."""
        if n == 0:
            return []
        if n <= self.max_length:
            return [(tokens[-(self.max_length + 1):], n)]
        first = len(tokens) - n  # the index of the first continuation token
        kept, scored_until = [], 1  # rolling windows score tokens[1:] once each, in order
        for window, scored in rolling_windows(tokens, self.max_length, self.stride):
            scored_until += scored
            own = min(scored, scored_until - first)  # only the continuation's targets
            if own > 0:
                kept.append((window, own))
        return kept

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = document_windows(self.tokenizer, request.args[0], self.max_length, self.stride)
            results.append(sum(log_prob for log_prob, _, _ in score(self.model, windows, self.batch_size)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Through HAVOC's engine: batched, each request stopped at its own `until` strings (no token is
        generated past them) or max_gen_toks; sampled when do_sample is true, greedy otherwise."""
        engine = Engine(self.model, self.tokenizer, slots=self.batch_size, context=self.max_length,
                        max_queue=len(requests))
        sequences = []
        for i, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1])
            until = kwargs.pop("until", None) or []
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            params = SamplingParams(
                max_tokens=max_new, stop=[s for s in ([until] if isinstance(until, str) else until) if s],
                temperature=float(kwargs.pop("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.pop("top_p", None) or 1.0), top_k=int(kwargs.pop("top_k", None) or 0),
                seed=self.seed + i,
            )
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            prompt = generation_prompt(self.tokenizer, context, keep)
            sequences += engine.submit([prompt], params)
        completions = engine.collect(sequences)
        return [c.text for c in tqdm(completions, disable=disable_tqdm, desc="generate_until")]
