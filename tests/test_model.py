"""HavocModel behaviour: the specification's 13 test areas, the cache, padding and bad input."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from havoc_core.config import HavocConfig
from havoc_core.model import CausalLMOutput, GQAttention, GroupedQueryAttention, HavocModel, SigmaModel


# 1. Initialisation
def test_init_builds_layers_and_ties_weights(config, model):
    assert len(model.layers) == config.num_layers
    assert model.lm_head.weight is model.embed_tokens.weight
    assert SigmaModel is HavocModel and GroupedQueryAttention is GQAttention
    untied = HavocModel(dataclasses.replace(config, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    v, d = config.vocab_size, config.d_model
    assert untied.num_parameters() == model.num_parameters() + v * d


def test_gpt_neox_init(config):
    torch.manual_seed(0)
    big = HavocModel(dataclasses.replace(HavocConfig.havoc_small(), num_layers=1, initializer_range=0.05))
    w = big.layers[0].mlp.w1.weight
    assert abs(w.std().item() - 0.05) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(big.embed_tokens.weight[big.config.pad_token_id] == 0)
    assert torch.all(big.layers[0].attn_norm.weight == 1)


def test_7b_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = HavocModel(HavocConfig.havoc_7b())
    assert model.num_parameters() == 5_957_685_248
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    assert per_block == 41_943_040 + 135_266_304 + 8_192


# 2. Forward pass
def test_forward_shapes_and_unpacking(config, model, ids):
    out = model(ids)
    assert isinstance(out, CausalLMOutput) and out.past_kv is None
    assert out.logits.shape == (2, 24, config.vocab_size)
    logits, past_kv = model(ids, use_cache=True)
    assert torch.equal(logits, out.logits)


# 3. KV-cache shapes
def test_kv_cache_shapes(config, model, ids):
    _, past_kv = model(ids, use_cache=True)
    assert isinstance(past_kv, list) and len(past_kv) == config.num_layers
    for key, value in past_kv:
        assert key.shape == value.shape == (2, config.attention.num_kv_heads, 24, config.head_dim)
    _, past_kv = model(ids[:, :1], past_kv=past_kv, use_cache=True)
    assert past_kv[0][0].shape[2] == 25


# 4. Incremental decoding equals the uncached forward
@torch.no_grad()
def test_cached_decoding_equals_uncached_forward_over_64_steps(model, ids):
    prompt = ids[:, :8]
    logits, past_kv = model(prompt, use_cache=True)
    tokens, step_logits = prompt, [logits[:, -1]]
    for _ in range(64):
        nxt = step_logits[-1].argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, nxt), dim=1)
        logits, past_kv = model(nxt, past_kv=past_kv, use_cache=True)
        step_logits.append(logits[:, -1])
    full = model(tokens).logits[:, 7:]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(prompt, max_new_tokens=64, eos_token_id=None), tokens)


@torch.no_grad()
def test_multi_token_chunks_after_cache_match_full_forward(model, ids):
    _, past_kv = model(ids[:, :10], use_cache=True)
    chunk = model(ids[:, 10:], past_kv=past_kv).logits
    torch.testing.assert_close(chunk, model(ids).logits[:, 10:], rtol=0, atol=1e-5)


# 5. Attention mask
def test_build_attention_mask_causal_with_offset(model, ids):
    mask = model.build_attention_mask(ids[:, :3], past_length=2)
    assert mask.shape == (2, 1, 3, 5)
    allowed = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert torch.all(mask[0, 0][~allowed] == float("-inf"))


def test_build_attention_mask_hides_padding(model, ids):
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    mask = model.build_attention_mask(ids[:, :4], attention_mask=padding)
    assert torch.all(mask[0, 0, 1:, 0] == float("-inf"))  # real tokens never see the pad
    assert torch.equal(mask[1, 0] == 0, torch.ones(4, 4).tril().bool())


# 6. Loss
def test_loss_is_shifted_cross_entropy(config, model, ids):
    loss, logits = model.compute_loss(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    labels = ids.clone()
    labels[:, :5] = -100
    loss, _ = model.compute_loss(ids, labels=labels)
    expected = F.cross_entropy(logits[:, 4:-1].reshape(-1, config.vocab_size), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_loss_with_nothing_to_score_is_zero_not_nan(model, ids):
    loss, _ = model.compute_loss(ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0


# 7. Padding
def test_loss_ignores_padding_by_position(config, model, ids):
    row = ids[:1, :10]
    alone, _ = model.compute_loss(row)
    mask = torch.cat((torch.ones(1, 10), torch.zeros(1, 6)), dim=1).long()
    junk = torch.cat((row, ids[:1, :6]), dim=1)  # padding slots holding real ids, masked out
    assert torch.allclose(model.compute_loss(junk, attention_mask=mask)[0], alone, atol=1e-6)
    labels = junk.clone()
    labels[:, 10:] = -100
    assert torch.allclose(model.compute_loss(junk, labels=labels)[0], alone, atol=1e-6)


def test_eos_is_learnt_when_it_shares_the_pad_id(config, ids):
    # Imported HF configs often have pad == eos: a loss that masked by id would never teach EOS.
    shared = dataclasses.replace(config, pad_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    model = HavocModel(shared)
    row = ids[:1, :12].clone()
    row[0, 6] = 2
    loss, logits = model.compute_loss(row)
    expected = F.cross_entropy(logits[0, :-1], row[0, 1:])  # every target, the eos one included
    torch.testing.assert_close(loss, expected)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(config, model, ids):
    short, long = ids[0, :9], ids[1, :20]
    batch = torch.full((2, 20), config.pad_token_id)
    batch[0, 11:], batch[1] = short, long
    mask = (torch.arange(20) >= 11).long().expand(2, 20).clone()
    mask[1] = 1
    logits = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, 11:], model(short[None]).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], model(long[None]).logits[0], rtol=0, atol=1e-5)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_cached_decoding_of_a_left_padded_batch_equals_the_full_masked_forward(config, model, ids):
    # Row 0 is left-padded by 5; each cached step's logits must equal a full forward with the mask.
    batch = ids[:, :12].clone()
    batch[0, :5] = config.pad_token_id
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    logits, past_kv = model(batch, attention_mask=mask, use_cache=True)
    tokens, steps = batch, []
    for _ in range(6):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens, mask = torch.cat((tokens, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
        logits, past_kv = model(nxt, attention_mask=mask, past_kv=past_kv, use_cache=True)
        steps.append(logits[:, -1])
    full = model(tokens, attention_mask=mask).logits[:, -6:]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)


# 8. Generation
def test_generate_batched_prompts_match_single_prompts(model, ids):
    prompts = [ids[0, :5].tolist(), ids[1, :12].tolist()]
    batched = model.generate(prompts, max_new_tokens=10, eos_token_id=None)
    assert batched.shape == (2, 22)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=None)
        assert batched[row, -10:].tolist() == alone[0, -10:].tolist()


def test_generate_stops_each_row_at_eos(config, model, ids):
    prompt = ids[:, :6]
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=None)
    eos = free[0, 6 + 2].item()  # row 0's third new token plays EOS
    out = model.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    new0 = out[0, 6:].tolist()
    assert new0[: new0.index(eos) + 1] == free[0, 6:6 + new0.index(eos) + 1].tolist()
    assert all(t == config.pad_token_id for t in new0[new0.index(eos) + 1:])
    if eos not in free[1, 6:].tolist():
        assert out.shape[1] == 18 and torch.equal(out[1], free[1])


def _favour(model, token: int) -> None:
    """Make `token` the certain greedy choice, whatever the random weights."""

    def hook(module, args, out):
        out = out.clone()
        out[..., token] = 1e4
        return out

    model.lm_head.register_forward_hook(hook)


def test_generate_defaults_to_config_eos(config, ids):
    torch.manual_seed(0)
    model = HavocModel(config).eval()
    _favour(model, config.eos_token_id)
    out = model.generate(ids[:1, :4], max_new_tokens=8)
    assert out.tolist() == [ids[0, :4].tolist() + [config.eos_token_id]]
    assert model.generate(ids[:1, :4], max_new_tokens=8, eos_token_id=None).shape == (1, 12)


def test_generate_stops_at_any_of_several_eos_ids(config, ids):
    torch.manual_seed(0)
    model = HavocModel(dataclasses.replace(config, eos_token_id=[2, 9])).eval()
    _favour(model, 9)
    assert model.generate(ids[:1, :4], max_new_tokens=8).tolist() == [ids[0, :4].tolist() + [9]]
    assert model.generate(ids[:1, :4], max_new_tokens=8, eos_token_id=[9]).shape == (1, 5)
    assert model.generate(ids[:1, :4], max_new_tokens=8, eos_token_id=2).shape == (1, 12)


def test_generate_computes_logits_for_the_last_position_only(model, ids):
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    model.generate(ids[:, :20], max_new_tokens=4, eos_token_id=None)
    assert rows == [1, 1, 1, 1]  # the 20-token prompt included


def test_top_p_keeps_exactly_the_nucleus():
    from havoc_core.model.transformer import filter_logits

    def survivors(probs, top_p):
        return torch.isfinite(filter_logits(torch.tensor(probs).log(), top_p=top_p)).nonzero().flatten().tolist()

    # The smallest set of the most likely tokens whose probability reaches top_p.
    assert survivors([0.5, 0.25, 0.25], 0.5) == [0]
    assert survivors([0.5, 0.3, 0.2], 0.8) == [0, 1]
    assert survivors([0.5, 0.3, 0.2], 0.81) == [0, 1, 2]
    assert survivors([0.1, 0.2, 0.3, 0.4], 0.7) == [2, 3]
    assert survivors([0.1, 0.2, 0.3, 0.4], 0.71) == [1, 2, 3]
    assert survivors([0.9, 0.05, 0.05], 0.1) == [0]


def test_generate_sampling_options(model, ids):
    out = model.generate(ids[:, :4], max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9, seed=3, eos_token_id=None)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], ids[:, :4])
    # top_k=1 is greedy whatever the temperature.
    greedy = model.generate(ids[:, :4], max_new_tokens=6, eos_token_id=None)
    assert torch.equal(model.generate(ids[:, :4], max_new_tokens=6, temperature=1.5, top_k=1, seed=0, eos_token_id=None), greedy)


# 9. Determinism
def test_generation_is_reproducible_with_a_seed(model, ids):
    runs = [model.generate(ids[:, :4], max_new_tokens=16, temperature=1.0, seed=7, eos_token_id=None) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = model.generate(ids[:, :4], max_new_tokens=16, temperature=1.0, seed=8, eos_token_id=None)
    assert not torch.equal(runs[0], other)


# 10. Save and load
@pytest.mark.parametrize("use_safetensors", [True, False])
def test_save_load_round_trip(tmp_path, config, model, ids, use_safetensors):
    model.save_pretrained(tmp_path, use_safetensors=use_safetensors)
    assert HavocConfig.load(tmp_path / "config.json") == config
    loaded = HavocModel.load_pretrained(tmp_path)
    assert not loaded.training and loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp files left


def test_tied_matrix_stored_once(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")


def test_load_with_dtype(tmp_path, model, ids):
    model.save_pretrained(tmp_path)
    loaded = HavocModel.load_pretrained(tmp_path, dtype=torch.bfloat16)
    for (name, ours), theirs in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs.to(torch.bfloat16)), name
    logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(ids).logits, rtol=0, atol=0.05)
    assert (logits.float().argmax(-1) == model(ids).logits.argmax(-1)).float().mean() > 0.9


def test_rms_norm_follows_its_formula():
    from havoc_core.model.blocks import RMSNorm

    norm = RMSNorm(8, eps=0.5)  # a large eps: misplacing it changes the result visibly
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x.to(torch.bfloat16)).float(), expected, rtol=0.02, atol=0.02)


# 11. Gradient flow
def test_gradients_reach_every_parameter(model, ids):
    model.train()
    loss, _ = model.compute_loss(ids)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# 12. Dropout
def test_dropout_only_in_training(config, ids):
    torch.manual_seed(0)
    model = HavocModel(dataclasses.replace(config, dropout=0.3))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


# 13. from_config
def test_from_config(config):
    torch.manual_seed(0)
    a = HavocModel.from_config(config)
    torch.manual_seed(0)
    b = HavocModel(config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# Bad input
def test_out_of_range_ids_are_named(config, model):
    with pytest.raises(ValueError, match=r"token id 256 is outside the vocabulary \[0, 256\)"):
        model(torch.tensor([[5, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_float_ids_are_a_type_error(model):
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))


def test_bad_shapes(model, ids):
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 5))


def test_too_long_input_gives_both_numbers(config, model):
    n = config.max_seq_len
    with pytest.raises(ValueError, match=f"{n + 1} tokens, more than max_seq_len={n}"):
        model(torch.ones(1, n + 1, dtype=torch.long))
    _, past = model(torch.ones(1, n - 1, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=f"after {n - 1} cached ones is {n + 1} tokens"):
        model(torch.ones(1, 2, dtype=torch.long), past_kv=past)


def test_generate_too_long_gives_both_numbers(config, model):
    with pytest.raises(ValueError, match=rf"prompt \(10 tokens\) \+ max_new_tokens \({config.max_seq_len}\)"):
        model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=config.max_seq_len)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"max_new_tokens": -2}])
def test_generate_rejects_bad_sampling(model, ids, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        model.generate(ids, **kwargs)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HavocModel.load_pretrained(tmp_path / "nope")
    tmp_path.joinpath("config.json").write_text(json.dumps(HavocConfig.havoc_tiny().to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        HavocModel.load_pretrained(tmp_path)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_truncated_weights_are_named(tmp_path, model, use_safetensors):
    model.save_pretrained(tmp_path, use_safetensors=use_safetensors)
    path = tmp_path / ("model.safetensors" if use_safetensors else "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path.name} cannot be read.*truncated or corrupted"):
        HavocModel.load_pretrained(tmp_path)


def test_corrupted_header_is_named(tmp_path, model):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"garbage!!!!!"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        HavocModel.load_pretrained(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path, config, model):
    model.save_pretrained(tmp_path)
    dataclasses.replace(config, d_model=128).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"model.safetensors does not match its config.json: .*embed_tokens.weight has shape \(256, 64\) but config.json implies \(256, 128\)"):
        HavocModel.load_pretrained(tmp_path)
    dataclasses.replace(config, num_layers=3).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match="missing tensors: layers.2"):
        HavocModel.load_pretrained(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['HAVOC_PWNED']}",))


def test_pickle_weights_never_run_code(tmp_path, model, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HAVOC_PWNED", str(marker))
    model.save_pretrained(tmp_path, use_safetensors=False)
    torch.save({"embed_tokens.weight": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing .*pytorch_model.bin.*weights_only=True"):
        HavocModel.load_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on machines without a GPU")
def test_cuda_without_a_gpu_is_named(tmp_path, model):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        HavocModel.load_pretrained(tmp_path, device="cuda")
