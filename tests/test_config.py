import dataclasses
import json

import pytest

from havoc_core.config import AttentionConfig, HavocConfig, MLPConfig


def test_7b_preset_is_the_specification():
    c = HavocConfig.havoc_7b()
    assert (c.num_layers, c.d_model, c.attention.num_heads, c.attention.num_kv_heads) == (32, 4096, 32, 8)
    assert (c.head_dim, c.mlp.hidden_dim, c.vocab_size, c.max_seq_len) == (128, 11008, 70000, 4096)
    assert c.tie_word_embeddings and c.dropout == 0.0
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("havoc_1b", (2048, 16, 16, 4, 5504, 70000, 4096)),
        ("havoc_small", (512, 8, 8, 2, 1376, 8192, 1024)),
    ],
)
def test_presets(name, expected):
    c = getattr(HavocConfig, name)()
    got = (c.d_model, c.num_layers, c.attention.num_heads, c.attention.num_kv_heads,
           c.mlp.hidden_dim, c.vocab_size, c.max_seq_len)
    assert got == expected and c.dropout == 0.0
    assert HavocConfig.preset(name.removeprefix("havoc_")) == c


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        HavocConfig.preset("huge")


def test_json_round_trip(tmp_path):
    c = dataclasses.replace(HavocConfig.havoc_small(), rope_theta=500000.0, tie_word_embeddings=False)
    assert HavocConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    c.save(tmp_path / "config.json")
    assert HavocConfig.load(tmp_path / "config.json") == c
    assert isinstance(HavocConfig.load(tmp_path / "config.json").attention, AttentionConfig)


def test_head_dim_is_derived_not_a_field():
    assert "head_dim" not in HavocConfig().to_dict()
    assert HavocConfig.havoc_small().head_dim == 64


@pytest.mark.parametrize(
    "changes, fields",
    [
        ({"d_model": 500}, "attention.num_heads (8) must divide d_model (500)"),
        ({"attention": AttentionConfig(8, 3)}, "attention.num_kv_heads (3) must divide attention.num_heads (8)"),
        ({"d_model": 8 * 5}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_layers": -1}, "num_layers"),
        ({"mlp": MLPConfig(0)}, "mlp.hidden_dim"),
        ({"eos_token_id": 8192}, "eos_token_id"),
        ({"eos_token_id": [2, 8192]}, "eos_token_id"),
        ({"eos_token_id": []}, "eos_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ],
)
def test_invalid_values_are_rejected_on_replace(changes, fields):
    with pytest.raises(ValueError, match=fields.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(HavocConfig.havoc_small(), **changes)


def test_invalid_values_rejected_at_construction():
    with pytest.raises(ValueError, match="attention.num_heads"):
        HavocConfig(d_model=100, attention=AttentionConfig(3, 1))


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown HavocConfig keys: n_layers"):
        HavocConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown attention keys: heads"):
        HavocConfig.from_dict({"attention": {"heads": 3}})


def test_load_names_the_bad_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        HavocConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        HavocConfig.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"d_model": 7}))
    with pytest.raises(ValueError, match="config.json.*d_model"):
        HavocConfig.load(bad)
