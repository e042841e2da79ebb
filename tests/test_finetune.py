"""Fine-tuning: chat batches score assistant tokens only; full and LoRA SFT learn; LoRA merges exactly."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from havoc_core.interop import havoc_to_hf
from havoc_core.model import HavocModel
from havoc_core.model.transformer import IGNORE_INDEX
from havoc_training.checkpoint import export_checkpoint
from havoc_training.config import TrainConfig
from havoc_training.finetune import ChatLoader
from havoc_training.lora import apply_lora, merge_lora
from havoc_training.trainer import Trainer

WORDS = ["red", "green", "blue", "black", "white", "orange"]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    lines = []
    for i in range(300):
        word = rng.choice(WORDS)
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "Repeat the colour."},
            {"role": "user", "content": f"{i} colour: {word}"},
            {"role": "assistant", "content": word.upper()},
        ]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer):
    from havoc_core.config import HavocConfig

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "model"
    HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size)).save_pretrained(directory)
    return directory


@pytest.fixture
def config(tmp_path, chats, tokenizer_dir, base_model):
    return TrainConfig(data=str(chats), tokenizer=str(tokenizer_dir), out=str(tmp_path / "ft"), init_from=str(base_model),
                       seq_len=64, micro_batch=8, global_batch_tokens=512, max_steps=60, lr=3e-3, min_lr=3e-4,
                       warmup_steps=5, log_every=5, eval_every=30, eval_batches=2, save_every=30, val_fraction=0.1)


def test_chat_batches_score_assistant_tokens_only(chats, tokenizer):
    loader = ChatLoader(chats, tokenizer, seq_len=64, batch_size=4, shuffle=False)
    inputs, targets = loader.next_batch()
    first = json.loads(chats.read_text().splitlines()[0])["messages"]
    ids, learn = tokenizer.encode_chat(first)
    assert inputs[0, : len(ids) - 1].tolist() == ids[:-1]
    scored = targets[0][targets[0] != IGNORE_INDEX].tolist()
    assert scored == tokenizer.encode(first[2]["content"]) + [tokenizer.end_token_id]
    assert tokenizer.decode(scored) == first[2]["content"] + "<|end|>"


def test_full_finetune_learns_the_task(config, tokenizer):
    config = dataclasses.replace(config, max_steps=150, eval_every=150, save_every=150)
    summary = Trainer(config, chat=True).train()
    assert summary["val_loss"] < 0.5 and summary["last_loss"] < summary["first_loss"] / 4
    model = HavocModel.load_pretrained(export_checkpoint(summary["checkpoint"], Path(config.out) / "model"))
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Repeat the colour."},
                                            {"role": "user", "content": "7 colour: blue"}], add_generation_prompt=True)
    out = model.generate([prompt], max_new_tokens=8, eos_token_id=tokenizer.end_token_id)
    assert tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True) == "BLUE"


def test_lora_trains_adapters_only_and_merges_exactly(config, base_model):
    lora = dataclasses.replace(config, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    trainer = Trainer(lora, chat=True)
    trainable = [n for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    summary = trainer.train()
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    base = HavocModel.load_pretrained(base_model)
    for name, p in base.state_dict().items():  # frozen: the base weights never moved
        assert torch.equal(trainer.raw_model.state_dict()[name], p), name
    ids = torch.randint(7, base.config.vocab_size, (2, 20))
    trainer.raw_model.eval()
    with torch.no_grad():
        adapted = trainer.raw_model(ids).logits
    merged = HavocModel.load_pretrained(export_checkpoint(summary["checkpoint"], Path(lora.out) / "merged"))
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(base(ids).logits, adapted, atol=1e-3)


def test_merge_lora_in_memory(base_model):
    model = HavocModel.load_pretrained(base_model)
    apply_lora(model, rank=2, alpha=4.0, targets=["wq", "w3"])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_()
    ids = torch.randint(7, 100, (1, 12))
    before = model(ids).logits
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_finetune_from_a_hugging_face_llama_folder(config, base_model, tmp_path):
    havoc_to_hf(base_model, tmp_path / "hf")
    summary = Trainer(dataclasses.replace(config, init_from=str(tmp_path / "hf"), max_steps=10), chat=True).train()
    assert summary["last_loss"] < summary["first_loss"]


def test_tokenizer_defaults_to_the_one_beside_init_from(config, base_model, tokenizer, tmp_path):
    import shutil

    shutil.copytree(base_model, tmp_path / "exported")
    tokenizer.save(tmp_path / "exported")
    run = TrainConfig(data=config.data, init_from=str(tmp_path / "exported"), out=str(tmp_path / "ft"))
    assert run.tokenizer == str(tmp_path / "exported")
    with pytest.raises(ValueError, match="data and tokenizer are required"):
        TrainConfig(data=config.data, init_from=str(base_model))  # no tokenizer beside this one


# Bad input
def test_finetune_needs_init_from(config):
    with pytest.raises(ValueError, match="fine-tuning needs init_from"):
        Trainer(dataclasses.replace(config, init_from=""), chat=True)


def test_bad_chat_lines_are_named(config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "nope"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 needs a 'messages' list"):
        Trainer(dataclasses.replace(config, data=str(bad)), chat=True)
    bad.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: messages\[0\] needs a role"):
        Trainer(dataclasses.replace(config, data=str(bad)), chat=True)


def test_model_and_tokenizer_that_do_not_belong_together(config, tmp_path):
    from havoc_core.config import HavocConfig

    HavocModel(HavocConfig.havoc_tiny()).save_pretrained(tmp_path / "other")  # vocab 256, tokenizer 1000
    with pytest.raises(ValueError, match="vocab_size 256, the tokenizer 1000"):
        Trainer(dataclasses.replace(config, init_from=str(tmp_path / "other")), chat=True)


def test_unknown_lora_target(config):
    with pytest.raises(ValueError, match="lora_targets from wq, wk"):
        Trainer(dataclasses.replace(config, lora_rank=2, lora_targets=["q_proj"]), chat=True)


def test_dropped_and_cut_conversations_are_reported(tmp_path, tokenizer):
    long_reply = "word " * 200
    lines = [{"messages": [{"role": "user", "content": "only a question"}]},  # no assistant turn
             {"messages": [{"role": "user", "content": "q " * 200}, {"role": "assistant", "content": "late"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_reply}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fits"}]}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    loader = ChatLoader(path, tokenizer, seq_len=32, batch_size=1, val_fraction=0)
    assert len(loader.examples) == 2
    assert loader.report == (f"{path}: of 4 train conversations, 1 had no assistant message and were left out, "
                             "1 had no assistant token within seq_len + 1 = 33 tokens and were left out, "
                             "1 were cut to seq_len + 1 = 33 tokens (raise seq_len to keep them whole)")


def test_a_small_chat_file_trains_with_the_defaults(tmp_path, config, capsys):
    # 60 conversations: the held-out 5% is smaller than a micro-batch; validation scores what there is.
    lines = (tmp_path / "all.jsonl", Path(config.data).read_text().splitlines()[:60])
    lines[0].write_text("\n".join(lines[1]) + "\n")
    summary = Trainer(dataclasses.replace(config, data=str(lines[0]), val_fraction=0.05, max_steps=4),
                      chat=True).train()
    assert summary["val_loss"] > 0
    summary = Trainer(dataclasses.replace(config, data=str(lines[0]), val_fraction=0.0, max_steps=4,
                                          out=str(tmp_path / "noval")), chat=True).train()
    assert "val_loss" not in summary and "training without validation" in capsys.readouterr().out


def test_finetune_seq_len_longer_than_the_model(config):
    with pytest.raises(ValueError, match=r"seq_len 512 is longer than the model's max_seq_len 256 \(from init_from"):
        Trainer(dataclasses.replace(config, seq_len=512, global_batch_tokens=4096), chat=True)


def test_two_processes_match_one_for_sft_with_uneven_masks(tmp_path, tokenizer_dir, base_model):
    import random
    import subprocess
    import sys

    from havoc_training.metrics import read_metrics

    rng = random.Random(2)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{i} colours?"}, {"role": "assistant", "content": " ".join(
        rng.choice(WORDS) for _ in range(rng.randint(1, 15)))}]}) for i in range(120)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    one = TrainConfig(data=str(tmp_path / "c.jsonl"), tokenizer=str(tokenizer_dir), init_from=str(base_model),
                      out=str(tmp_path / "one"), seq_len=48, micro_batch=2, global_batch_tokens=384, max_steps=4,
                      lr=3e-3, warmup_steps=1, log_every=1, eval_every=2, eval_batches=2, save_every=4)
    Trainer(one, chat=True).train()
    args = []
    for f in dataclasses.fields(one):
        value = getattr(one if f.name != "out" else dataclasses.replace(one, out=str(tmp_path / "two")), f.name)
        if not isinstance(value, bool):
            args += ["--" + f.name.replace("_", "-"), json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "havoc.cli", "finetune", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)
