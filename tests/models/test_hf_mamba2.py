"""Mamba-2 interop: logits and greedy decoding match `transformers` Mamba2ForCausalLM (torch CPU, f32) on tiny
random models with n_groups > 1; checkpoints round-trip both ways; hybrids are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import build, preset
from lmx.models.hf import config_from_hf, config_to_hf, load_hf, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2, state_size=16,
            n_groups=2, conv_kernel=4, chunk_size=16, layer_norm_epsilon=1e-5,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no eos: HF generate never stops early
CONFIGS = {
    "mamba2": TINY,
    # tied head, in/out projection biases, and a Δ clamp that binds (softplus(dt + dt_bias) is around 0.7)
    "mamba2_tied": dict(TINY, tie_word_embeddings=True, use_bias=True, time_step_limit=(0.0, 0.5)),
}
SEQ = 40  # 2.5 chunks of 16
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> (HF model, checkpoint dir), built once with weights far from HF's init."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**CONFIGS[name])).to(torch.float32)
            with torch.no_grad():
                for pname, p in hf.named_parameters():
                    if "norm" in pname:
                        p.uniform_(0.5, 1.5)
                    else:
                        p.normal_(0.0, 0.2)
            path = tmp_path_factory.mktemp(name)
            hf.eval().save_pretrained(path)
            cache[name] = hf, path
        return cache[name]

    return get


def _tokens(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (B, T))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(ckpt, name):
    hf, path = ckpt(name)
    model, params = load_hf(path)
    assert model.cfg.ssm.n_groups == 2 and model.cfg.layer_pattern == ("ssm", "ssm")
    tokens_BT = _tokens(2, SEQ)
    with torch.no_grad():
        ref_BTV = hf(torch.tensor(tokens_BT)).logits.numpy()
    out_BTV = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens_BT)).logits_BTV)
    err = float(np.abs(out_BTV - ref_BTV).max())
    print(f"{name}: max |logits| {np.abs(ref_BTV).max():.2f}, max abs diff {err:.2e}")
    assert np.abs(ref_BTV).max() > 1.0
    np.testing.assert_allclose(out_BTV, ref_BTV, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(ckpt):
    from lmx.decoding import generate

    hf, path = ckpt("mamba2")
    model, params = load_hf(path)
    prompts = [_tokens(1, n, seed=n)[0].tolist() for n in (7, 3)]  # unequal: the prefill is right-padded
    out = generate(model, params, prompts, max_new_tokens=32)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32)
        assert np.asarray(out.tokens_BRT[b, 0]).tolist() == ref[0, len(prompt):].tolist(), f"prompt {b} diverges"


def test_save_hf_round_trip_and_loads_in_transformers(ckpt, tmp_path):
    hf, path = ckpt("mamba2_tied")
    model, params = load_hf(path)
    save_hf(model, params, tmp_path / "out")
    hf2, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = torch.tensor(_tokens(1, 12, seed=3))
    with torch.no_grad():
        np.testing.assert_array_equal(hf2.eval()(tokens).logits.numpy(), hf(tokens).logits.numpy())
    model2, params2 = load_hf(tmp_path / "out")
    assert model2.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert config_from_hf(json.loads((tmp_path / "out" / "config.json").read_text())) == model.cfg


def test_hybrids_and_bad_configs_are_refused(tmp_path):
    cfg = preset("hybrid-tiny")
    with pytest.raises(ValueError, match="mixes attention and SSM layers"):
        config_to_hf(cfg, "mamba2")
    with pytest.raises(ValueError, match="no Hugging Face LlamaForCausalLM equivalent"):
        config_to_hf(preset("mamba2-tiny"), "llama")
    with pytest.raises(ValueError, match="mixes attention and SSM layers"):
        save_hf(build(cfg), {}, tmp_path / "x")
    bad = config_to_hf(preset("mamba2-tiny"), "mamba2") | {"num_heads": 6}
    with pytest.raises(ValueError, match=r"ssm.num_heads \* ssm.head_dim = 6 \* 16 = 96"):
        config_from_hf(bad)
