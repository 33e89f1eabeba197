"""Hugging Face interop: logits and greedy decoding match `transformers` (torch CPU, f32, eager attention)
on tiny random Llama / Qwen2 models; checkpoints round-trip; bad checkpoints and configs fail clearly."""

import copy
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lmx.data.hf_tokenizer import HFTokenizer
from lmx.models import hf as lmx_hf
from lmx.models.hf import config_from_hf, config_to_hf, load_hf, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no eos: HF generate never stops early
# name -> (HF config class, kwargs). head_dim 8, theta 100 gives wavelengths 6.3, 20, 63, 200: with original
# max 32 and low/high factors 1/4, all three llama3 bands (<8 kept, 8..32 smoothed, >32 divided) are used.
HF_CONFIGS = {
    "llama_gqa": ("LlamaConfig", dict(TINY, rope_theta=10000.0)),
    "llama3_rope": ("LlamaConfig", dict(TINY, rope_theta=100.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama_linear": ("LlamaConfig", dict(TINY, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2_tied": ("Qwen2Config", dict(TINY, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_swa": ("Qwen2Config", dict(TINY, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=0)),
}
SEQ = 40  # > original_max_position_embeddings of llama3_rope, > sliding window of qwen2_swa
ATOL = 1e-4


def _randomize(model):
    """Weights far from HF's small default init so that a wrong layout or convention cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> (HF model, checkpoint dir written by save_pretrained); each model is built once."""
    cache = {}

    def get(name):
        if name not in cache:
            cls_name, kw = HF_CONFIGS[name]
            torch.manual_seed(sum(map(ord, name)))
            cfg = getattr(transformers, cls_name)(**kw)
            model = _randomize(transformers.AutoModelForCausalLM.from_config(
                cfg, attn_implementation="eager", dtype=torch.float32))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = model, path
        return cache[name]

    return get


def _hf_logits(model, tokens_BT, mask_BT=None):
    mask = None if mask_BT is None else torch.tensor(mask_BT)
    with torch.no_grad():
        return model(torch.tensor(tokens_BT), attention_mask=mask).logits.numpy()


def _lmx_logits(model, params, tokens_BT):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens_BT)).logits_BTV)


def _tokens(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def _max_diff(a, b):
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(ckpt, name):
    hf, path = ckpt(name)
    model, params = load_hf(path)
    tokens_BT = _tokens(2, SEQ, TINY["vocab_size"])
    ref_BTV = _hf_logits(hf, tokens_BT)
    out_BTV = _lmx_logits(model, params, tokens_BT)
    print(f"{name}: max |logits| {np.abs(ref_BTV).max():.2f}, max abs diff {_max_diff(out_BTV, ref_BTV):.2e}")
    assert np.abs(ref_BTV).max() > 1.0  # discriminative: logits are far from zero
    np.testing.assert_allclose(out_BTV, ref_BTV, atol=ATOL, rtol=0)


def test_right_padded_batch_matches_transformers(ckpt):
    hf, path = ckpt("llama_gqa")
    model, params = load_hf(path)
    lens = [SEQ, 23]
    tokens_BT = _tokens(2, SEQ, TINY["vocab_size"], seed=1)
    mask_BT = (np.arange(SEQ)[None] < np.array(lens)[:, None]).astype(np.int64)
    tokens_BT = tokens_BT * mask_BT  # right padding with id 0
    ref_BTV = _hf_logits(hf, tokens_BT, mask_BT)
    out_BTV = _lmx_logits(model, params, tokens_BT)
    for b, n in enumerate(lens):
        print(f"padded row {b} (len {n}): max abs diff {_max_diff(out_BTV[b, :n], ref_BTV[b, :n]):.2e}")
        np.testing.assert_allclose(out_BTV[b, :n], ref_BTV[b, :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, shard_size_bytes", [
    ("llama3_rope", None), ("qwen2_tied", None), ("qwen2_swa", None), ("llama_gqa", 20_000)])
def test_save_hf_loads_in_transformers(ckpt, tmp_path, name, shard_size_bytes):
    hf, path = ckpt(name)
    model, params = load_hf(path)
    save_hf(model, params, tmp_path / "out", shard_size_bytes=shard_size_bytes)
    hf2, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens_BT = _tokens(2, SEQ, TINY["vocab_size"], seed=2)
    np.testing.assert_array_equal(_hf_logits(hf2.eval(), tokens_BT), _hf_logits(hf, tokens_BT))


@pytest.mark.parametrize("shard_size_bytes", [None, 20_000])
def test_save_load_round_trip(ckpt, tmp_path, shard_size_bytes):
    _, path = ckpt("llama_gqa")
    model, params = load_hf(path)
    out = save_hf(model, params, tmp_path / "out", shard_size_bytes=shard_size_bytes)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_size_bytes is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2 and (out / "model.safetensors.index.json").exists()
    model2, params2 = load_hf(out)
    assert model2.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_checkpoints(ckpt, tmp_path):
    hf, _ = ckpt("qwen2_tied")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "torch_bf16")
    model, params = load_hf(tmp_path / "torch_bf16")  # written by torch, read without it
    assert model.cfg.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == jnp.bfloat16
    want = hf.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), want)
    save_hf(model, params, tmp_path / "lmx_bf16")
    model2, params2 = load_hf(tmp_path / "lmx_bf16")
    assert model2.cfg == model.cfg
    as_f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    jax.tree.map(np.testing.assert_array_equal, as_f32(params2), as_f32(params))
    _, params32 = load_hf(tmp_path / "lmx_bf16", dtype="float32")
    assert params32["layers"]["attn"]["q"].dtype == jnp.float32


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_mismatched_checkpoint_lists_every_problem(ckpt, tmp_path):
    _, path = ckpt("llama_gqa")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]  # missing
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)  # unexpected
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)  # mis-shaped (16, 32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((4,), np.float32)  # ignored buffer
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    before = _digest(tmp_path)
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path)
    msg = str(err.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected (16, 32), got (8, 32)" in msg
    assert "inv_freq" not in msg
    assert _digest(tmp_path) == before


def test_save_hf_never_clobbers(ckpt, tmp_path, monkeypatch):
    _, path = ckpt("llama_gqa")
    model, params = load_hf(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(model, params, out)
    assert _digest(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lmx_hf, "save_file", fail)  # a save that fails midway
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, params, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    monkeypatch.undo()

    bad = jax.tree.map(lambda x: x, params)
    bad["layers"]["mlp"]["up"] = bad["layers"]["mlp"]["up"][:, :, :3]
    with pytest.raises(ValueError, match=r"layers/mlp/up: expected \(2, 32, 64\), got \(2, 32, 3\)"):
        save_hf(model, bad, out, overwrite=True)
    save_hf(model, params, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_config_round_trip(ckpt, name):
    _, path = ckpt(name)
    hf_dict = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf_dict)
    assert config_from_hf(config_to_hf(cfg, hf_dict["model_type"])) == cfg


def test_config_old_rope_layout():
    """transformers < 5 wrote rope_theta and rope_scaling at the top level."""
    new = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "max_position_embeddings": 256,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=5e5, torch_dtype="float32", rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    cfg = config_from_hf(new)
    assert config_from_hf(old) == cfg
    assert cfg.attention.rope_theta == 5e5 and cfg.attention.rope_scaling.original_max_position == 64


_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": None, "model_type": "gemma"}, "gemma"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 8, "max_window_layers": 1}, "sliding"),
])
def test_config_from_hf_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**_LLAMA, **change})


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_greedy_generation_matches_transformers(ckpt, name):
    gen = pytest.importorskip("lmx.decoding.generate", reason="lmx.decoding.generate not written yet")
    hf, path = ckpt(name)
    model, params = load_hf(path)
    prompts = [_tokens(1, n, TINY["vocab_size"], seed=n)[0].tolist() for n in (7, 3)]  # unequal lengths
    out = gen.generate(model, params, prompts, max_new_tokens=32)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            # one prompt at a time: no left padding needed on the HF side
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                              do_sample=False, max_new_tokens=32, min_new_tokens=32)
        ref_new = ref[0, len(prompt):].tolist()
        assert int(out.lengths_BR[b, 0]) == 32
        assert np.asarray(out.tokens_BRT[b, 0, :32]).tolist() == ref_new, f"prompt {b} diverges"


def _tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(["the cat sat on the mat", "two plus two is four"],
                            trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_hf_tokenizer(tmp_path):
    tok = _tiny_tokenizer(tmp_path)
    tok_cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": 0, "eos_token_id": [3]}))
    t = HFTokenizer.from_file(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)  # tokenizer_config wins over config.json for eos
    assert t.vocab_size == tok.get_vocab_size() and t.special_ids == {0, 1, 2}
    ids = t.encode("the cat sat", add_bos=True, add_eos=True)
    assert ids == [1, *(tok.token_to_id(w) for w in ("the", "cat", "sat")), 2]  # one bos only
    assert t.encode("the cat") == ids[1:3]
    assert t.decode(ids, skip_special=True) == "the cat sat"
    assert t.decode(ids).startswith("<s>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        t.decode([t.vocab_size])

    bare = HFTokenizer.from_file(tmp_path / "tokenizer.json")  # the file itself; ids from the sibling files
    assert bare.bos_id == 1
    (tmp_path / "tokenizer_config.json").unlink()
    fallback = HFTokenizer.from_file(tmp_path)
    assert (fallback.bos_id, fallback.eos_id, fallback.pad_id) == (None, 3, 0)
    with pytest.raises(ValueError, match="no bos"):
        fallback.encode("the", add_bos=True)
