"""havoc_humaneval for lm-eval: the same problems, stops and sandboxed execution as `havoc eval humaneval`."""

import os

import datasets

from havoc_eval import humaneval


def load(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(humaneval.problems())})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    # Where namespaces are not available, HAVOC_ALLOW_UNSANDBOXED=1 is lm-eval's --allow-unsandboxed.
    outcome = humaneval.check(doc, results[0], sandboxed=os.environ.get("HAVOC_ALLOW_UNSANDBOXED") != "1")
    return {"pass@1": float(outcome.passed)}
