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
from havoc_eval.scoring import score


@register_model("havoc")
class HavocLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu",
                 batch_size: int | str = 8, max_length: int | None = None, stride: int | None = None, **kwargs):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device:  # lm_eval's own default is cuda, also on machines without one
                warnings.warn(f"device {device!r} is not available; evaluating on the CPU", stacklevel=2)
            device = "cpu"
        self.model, self.tokenizer = load_model_and_tokenizer(pretrained, tokenizer, device=device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" falls back to 8
        self.max_length = int(max_length or self.model.config.max_seq_len)
        # The same windows as `havoc eval perplexity` by default, so the two agree on the same text.
        self.stride = int(stride or self.max_length // 2)

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
        sequences = []
        for request in requests:
            context_ids, continuation_ids = self._encode_pair(*request.args)
            tokens = (context_ids + continuation_ids)[-(self.max_length + 1):]  # keep the end
            sequences.append((tokens, len(continuation_ids)))
        with tqdm(total=len(sequences), disable=disable_tqdm, desc="loglikelihood") as bar:
            return [(log_prob, greedy) for log_prob, greedy, _ in score(self.model, sequences, self.batch_size, bar)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = document_windows(self.tokenizer, request.args[0], self.max_length, self.stride)
            results.append(sum(log_prob for log_prob, _, _ in score(self.model, windows, self.batch_size)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="generate_until"):
            chunk = order[start : start + self.batch_size]
            # Requests in one batch share the largest max_gen_toks; each is cut at its own stops.
            max_new = max(int(requests[i].args[1].get("max_gen_toks", 256)) for i in chunk)
            keep = self.max_length - max_new
            if keep < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            prompts = [[self.tokenizer.bos_token_id, *self.tokenizer.encode(requests[i].args[0])][-keep:] for i in chunk]
            out = self.model.generate(prompts, max_new_tokens=max_new, eos_token_id=self.tokenizer.eos_token_id)
            width = max(len(p) for p in prompts)
            for row, i in enumerate(chunk):
                own = int(requests[i].args[1].get("max_gen_toks", 256))
                text = self.tokenizer.decode(out[row, width : width + own].tolist(), skip_special_tokens=True)
                until = requests[i].args[1].get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    text = text.split(stop)[0] if stop else text
                results[i] = text
        return results
