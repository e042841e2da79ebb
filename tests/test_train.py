"""Training: loss falls, resume is exact under SIGKILL, DDP and FSDP2 match one process, bad input is caught."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from havoc_core.model import HavocModel
from havoc_core.tokenizer import Corpus, HavocTokenizer
from havoc_training.checkpoint import checkpoints, export_checkpoint
from havoc_training.config import TrainConfig, load_config
from havoc_training.data import prepare
from havoc_training.metrics import read_metrics
from havoc_training.trainer import Trainer, TrainingDiverged, lr_at


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer, corpus_files):
    out = tmp_path_factory.mktemp("train") / "data"
    prepare(Corpus(corpus_files), tokenizer, out, val_fraction=0.1)
    return out


@pytest.fixture
def config(tmp_path, data_dir, tokenizer_dir):
    return TrainConfig(data=str(data_dir), tokenizer=str(tokenizer_dir), out=str(tmp_path / "run"), model="tiny",
                       seq_len=32, micro_batch=4, global_batch_tokens=256, max_steps=8, lr=3e-3, min_lr=3e-4,
                       warmup_steps=2, log_every=1, eval_every=4, eval_batches=2, save_every=4, keep_last=2)


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def _cli_args(config: TrainConfig) -> list[str]:
    args = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        if not isinstance(value, bool):
            args += ["--" + f.name.replace("_", "-"), str(value)]
    return args


def test_loss_falls_and_outputs_are_written(config):
    config = dataclasses.replace(config, max_steps=40, eval_every=20, save_every=10)
    summary = Trainer(config).train()
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    assert 0 < summary["val_bpb"] < 10 and summary["val_loss"] > 0
    out = Path(config.out)
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-000030", "step-000040"]  # keep_last=2
    assert (out / "loss.png").stat().st_size > 1000 and list((out / "tensorboard").iterdir())
    assert sorted(_losses(out)) == list(range(1, 41))


def test_schedule_warms_up_then_decays(config):
    c = dataclasses.replace(config, max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(5, c) == pytest.approx(0.5) and lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55) and lr_at(100, c) == pytest.approx(0.1)


def test_weight_decay_skips_norms(config):
    trainer = Trainer(config)
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == config.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in plain["params"]) and all(p.dim() == 2 for p in decayed["params"])


def test_resume_after_sigkill_is_bit_identical(config, tmp_path):
    config = dataclasses.replace(config, seq_len=64, micro_batch=8, global_batch_tokens=1024, max_steps=40,
                                 save_every=20, eval_every=20)
    straight = dataclasses.replace(config, out=str(tmp_path / "straight"))
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "train", *_cli_args(straight)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]

    out = Path(config.out)
    proc = subprocess.Popen([sys.executable, "-m", "havoc.cli", "train", *_cli_args(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-000020" / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "checkpoints" / "step-000040").exists(), "the run finished before the kill"
    resumed = subprocess.run([sys.executable, "-m", "havoc.cli", "train", "--resume", *_cli_args(config)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _losses(out) == _losses(straight.out)  # every step, bit for bit


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(config, tmp_path, parallel):
    one = dataclasses.replace(config, out=str(tmp_path / "one"), max_steps=6)
    Trainer(one).train()
    two = dataclasses.replace(one, out=str(tmp_path / "two"), micro_batch=2, parallel=parallel)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "havoc.cli", "train", *_cli_args(two)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = _losses(one.out), _losses(two.out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    # The sharded checkpoint exports to one ordinary folder.
    model = HavocModel.load_pretrained(export_checkpoint(checkpoints(Path(two.out) / "checkpoints")[-1], tmp_path / "m"))
    assert model.config.vocab_size == 1000


def test_export_gives_the_trained_weights_and_tokenizer(config, tmp_path):
    trainer = Trainer(config)
    trainer.train()
    out = export_checkpoint(checkpoints(Path(config.out) / "checkpoints")[-1], tmp_path / "model")
    model = HavocModel.load_pretrained(out)
    ids = torch.randint(7, 1000, (1, 16))
    trainer.raw_model.eval()
    assert torch.equal(model(ids).logits, trainer.raw_model(ids).logits)
    assert HavocTokenizer.load(out).sha256 == trainer.tokenizer.sha256


def test_activation_checkpointing_changes_memory_not_results(config, tmp_path):
    plain = dataclasses.replace(config, out=str(tmp_path / "plain"), max_steps=4)
    checkpointed = dataclasses.replace(plain, out=str(tmp_path / "ckpt"), activation_checkpointing=True)
    Trainer(plain).train()
    Trainer(checkpointed).train()
    assert _losses(plain.out) == _losses(checkpointed.out)


def test_resume_of_a_finished_run_says_so(config):
    Trainer(dataclasses.replace(config, max_steps=4)).train()
    with pytest.raises(ValueError, match="already at step 4 and max_steps is 4; raise max_steps"):
        Trainer(dataclasses.replace(config, max_steps=4), resume=True).train()


def test_config_files_and_overrides(tmp_path, config):
    (tmp_path / "c.toml").write_text(f'data = "{config.data}"\ntokenizer = "{config.tokenizer}"\nmax_steps = 7\n'
                                     '[model_overrides]\nnum_layers = 3\n')
    loaded = load_config(tmp_path / "c.toml", {"lr": 0.01})
    assert (loaded.max_steps, loaded.lr, loaded.model_overrides) == (7, 0.01, {"num_layers": 3})
    assert loaded.model_config(1000).num_layers == 3
    (tmp_path / "c.yaml").write_text(f"data: {config.data}\ntokenizer: {config.tokenizer}\nseq_len: 64\n")
    assert load_config(tmp_path / "c.yaml").seq_len == 64


# Bad input
def test_unknown_keys_are_errors(tmp_path, config):
    (tmp_path / "c.toml").write_text('data = "d"\ntokenizer = "t"\nmax_step = 7\n')
    with pytest.raises(ValueError, match="unknown training config keys: max_step"):
        load_config(tmp_path / "c.toml")
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "train", str(tmp_path / "c.toml")], capture_output=True, text=True)
    assert run.returncode == 1 and "unknown training config keys: max_step" in run.stderr
    with pytest.raises(ValueError, match="unknown model_overrides keys: layers"):
        dataclasses.replace(config, model_overrides={"layers": 2}).model_config(1000)


def test_batch_that_does_not_divide(config):
    with pytest.raises(ValueError, match=r"global_batch_tokens \(300\) must be a multiple of .* = 128"):
        Trainer(dataclasses.replace(config, global_batch_tokens=300))


def test_data_of_another_tokenizer(config, tmp_path):
    HavocTokenizer.train([f"another corpus {i}" for i in range(100)], vocab_size=300).save(tmp_path / "tok")
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        Trainer(dataclasses.replace(config, tokenizer=str(tmp_path / "tok")))


def test_checkpoint_of_another_shape(config):
    Trainer(dataclasses.replace(config, max_steps=4)).train()
    bigger = dataclasses.replace(config, model_overrides={"num_layers": 3})
    with pytest.raises(ValueError, match="of another model shape .*num_layers: checkpoint 2, now 3"):
        Trainer(bigger, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(config, monkeypatch):
    trainer = Trainer(config)
    real_step = trainer._train_step
    monkeypatch.setattr(trainer, "_train_step", lambda: float("nan") if trainer.step == 6 else real_step())
    with pytest.raises(TrainingDiverged, match="loss is nan at step 6.*last good checkpoint is .*step-000004"):
        trainer.train()
    assert [p.name for p in checkpoints(Path(config.out) / "checkpoints")] == ["step-000004"]


def test_no_disk_space_while_saving(config, monkeypatch):
    Trainer(dataclasses.replace(config, max_steps=4)).train()
    import torch.distributed.checkpoint as dcp

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(OSError, match="could not save the checkpoint for step 8 .*No space left.*step-000004 is intact"):
        Trainer(config, resume=True).train()
    out = Path(config.out) / "checkpoints"
    assert [p.name for p in out.iterdir()] == ["step-000004"]  # no partial folder left


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['HAVOC_PWNED']}",))


def test_crafted_checkpoint_metadata_never_runs_code(config, tmp_path, monkeypatch):
    import pickle

    Trainer(dataclasses.replace(config, max_steps=4)).train()
    checkpoint = checkpoints(Path(config.out) / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HAVOC_PWNED", str(marker))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(ValueError, match="refusing checkpoint .*posix.system has no place in checkpoint metadata"):
        export_checkpoint(checkpoint, tmp_path / "out")
    with pytest.raises(ValueError, match="refusing checkpoint"):
        Trainer(dataclasses.replace(config, max_steps=8), resume=True)
    assert not marker.exists()
