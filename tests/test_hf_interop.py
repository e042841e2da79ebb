"""HAVOC against transformers' LlamaForCausalLM: same weights, same logits, through both conversions."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from havoc_core.config import AttentionConfig, HavocConfig
from havoc_core.interop import havoc_to_hf, hf_to_havoc
from havoc_core.model import HavocModel

SHAPES = [  # (heads, kv_heads, tied): GQA ratios 1, 2 and 4
    (4, 4, True),
    (4, 2, False),
    (8, 2, True),
]


def _havoc(heads, kv_heads, tied, seed=0, **changes):
    config = dataclasses.replace(
        HavocConfig.havoc_tiny(), attention=AttentionConfig(heads, kv_heads), tie_word_embeddings=tied,
        rope_theta=50000.0, rms_norm_eps=1e-6, **changes,
    )
    torch.manual_seed(seed)
    model = HavocModel(config).eval()
    with torch.no_grad():  # break the init's symmetry (norm weights are all ones)
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _padded_batch(vocab):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (3, 33), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    mask[2, :31] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _assert_same_logits(ours: HavocModel, theirs: LlamaForCausalLM):
    ids, mask = _padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
        assert (a - b).abs().max().item() <= 1e-4
        a = ours(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("heads, kv_heads, tied", SHAPES)
def test_havoc_to_hf_gives_the_same_logits(tmp_path, heads, kv_heads, tied):
    ours = _havoc(heads, kv_heads, tied)
    ours.save_pretrained(tmp_path / "havoc")
    havoc_to_hf(tmp_path / "havoc", tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs) is LlamaForCausalLM
    assert theirs.config.tie_word_embeddings == tied
    assert theirs.config.rope_parameters["rope_theta"] == 50000.0
    _assert_same_logits(ours, theirs)


@pytest.mark.parametrize("heads, kv_heads, tied", SHAPES)
def test_hf_to_havoc_gives_the_same_logits(tmp_path, heads, kv_heads, tied):
    torch.manual_seed(1)
    hf_config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 123456.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    theirs = LlamaForCausalLM(hf_config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    hf_to_havoc(tmp_path / "hf", tmp_path / "havoc")
    ours = HavocModel.load_pretrained(tmp_path / "havoc")
    assert ours.config.rope_theta == 123456.0 and ours.config.tie_word_embeddings == tied
    _assert_same_logits(ours, theirs)


def test_greedy_generation_matches_hf(tmp_path):
    ours = _havoc(8, 2, True)
    ours.save_pretrained(tmp_path / "havoc")
    havoc_to_hf(tmp_path / "havoc", tmp_path / "hf")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = theirs.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=40, eos_token_id=None), expected)


def test_several_eos_ids_survive_both_conversions(tmp_path):
    # Llama-3-Instruct lists <|end_of_text|> and <|eot_id|>; generation must stop on either.
    theirs = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=[2, 9]))
    theirs.save_pretrained(tmp_path / "hf")
    hf_to_havoc(tmp_path / "hf", tmp_path / "havoc")
    assert HavocModel.load_pretrained(tmp_path / "havoc").config.eos_token_ids == [2, 9]
    havoc_to_hf(tmp_path / "havoc", tmp_path / "back")
    assert AutoConfig.from_pretrained(tmp_path / "back").eos_token_id == [2, 9]


def test_havoc_to_hf_folder_works_alone(tmp_path, tokenizer):
    from transformers import AutoTokenizer, GenerationConfig

    from havoc.cli import main

    ours = HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size))
    ours.save_pretrained(tmp_path / "havoc")
    tokenizer.save(tmp_path / "havoc")
    assert main(["convert", "havoc-to-hf", str(tmp_path / "havoc"), str(tmp_path / "hf")]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("def f(x):")["input_ids"] == tokenizer.encode("def f(x):")
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    # Fine-tuning starts from the converted folder with the tokenizer found beside it.
    from havoc_training.config import TrainConfig

    assert TrainConfig(data="chats.jsonl", init_from=str(tmp_path / "hf")).tokenizer == str(tmp_path / "hf")
    with pytest.raises(ValueError, match="vocab_size 256, the tokenizer 1000"):
        tiny = HavocModel(HavocConfig.havoc_tiny())
        tiny.save_pretrained(tmp_path / "mismatch")
        havoc_to_hf(tmp_path / "mismatch", tmp_path / "hf2", tokenizer=tmp_path / "havoc")


def test_round_trip_is_lossless(tmp_path):
    ours = _havoc(4, 2, False)
    ours.save_pretrained(tmp_path / "a")
    havoc_to_hf(tmp_path / "a", tmp_path / "hf")
    hf_to_havoc(tmp_path / "hf", tmp_path / "b")
    back = HavocModel.load_pretrained(tmp_path / "b")
    assert back.config == ours.config
    for (name, x), (_, y) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(x, y), name


def test_sharded_checkpoint_and_legacy_config_spelling(tmp_path):
    """Older transformers wrote rope_theta at the top level and sharded with an index file."""
    torch.manual_seed(2)
    theirs = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 7777.0},
    )).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=7777.0, rope_scaling=None)
    cfg_file.write_text(json.dumps(cfg))
    hf_to_havoc(tmp_path / "hf", tmp_path / "havoc")
    ours = HavocModel.load_pretrained(tmp_path / "havoc")
    assert ours.config.rope_theta == 7777.0 and not ours.config.tie_word_embeddings
    _assert_same_logits(ours, theirs)


def _hf_dir(tmp_path, **config_changes):
    theirs = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    ))
    theirs.save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **config_changes}))
    return tmp_path / "hf"


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias is true"),
        ({"mlp_bias": True}, "mlp_bias is true"),
        ({"head_dim": 32}, "head_dim 32 x 4 heads != hidden_size 64"),
        ({"model_type": "gpt2"}, "model_type is 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ],
)
def test_unrepresentable_checkpoints_are_refused(tmp_path, changes, reason):
    src = _hf_dir(tmp_path, **changes)
    with pytest.raises(ValueError, match=f"cannot convert: {reason}".replace("(", r"\(")):
        hf_to_havoc(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extra_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _hf_dir(tmp_path)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, src / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected .*q_proj.bias"):
        hf_to_havoc(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_output_directory_must_be_new(tmp_path):
    src = _hf_dir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_havoc(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_convert_round_trip_and_errors(tmp_path):
    _havoc(4, 2, True).save_pretrained(tmp_path / "havoc")
    run = [sys.executable, "-m", "havoc.cli", "convert"]
    ok = subprocess.run(run + ["havoc-to-hf", str(tmp_path / "havoc"), str(tmp_path / "hf")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()
    ok = subprocess.run(run + ["hf-to-havoc", str(tmp_path / "hf"), str(tmp_path / "back")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(run + ["hf-to-havoc", str(tmp_path / "missing"), str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and "config.json does not exist" in bad.stderr and "Traceback" not in bad.stderr
