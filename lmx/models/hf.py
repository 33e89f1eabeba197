"""Hugging Face interop: `config.json` <-> ModelConfig and (sharded) safetensors <-> lmx params.

Supported: `LlamaForCausalLM` (Llama 2/3, RoPE default/linear/llama3), `Qwen2ForCausalLM` (Qwen2/2.5) and
`Mamba2ForCausalLM` (SSM layers only; attention/SSM hybrids have no HF equivalent).
Weights are read with `safetensors` (numpy; bfloat16 via ml_dtypes), so loading needs no torch.

Layouts. A torch Linear stores `[out, in]`; lmx stores `[in, ...out]` with heads split out:
  q_proj.weight [N*H, D] -> attn/q [D, N, H]     o_proj.weight [D, N*H] -> attn/o [N, H, D]
  gate_proj.weight [F, D] -> mlp/gate [D, F]     down_proj.weight [D, F] -> mlp/down [F, D]
  lm_head.weight [V, D] -> lm_head [D, V]        embed_tokens.weight [V, D] -> embed/embedding [V, D]
and per-layer tensors are stacked on a leading L axis. Mamba2 keeps HF's fused layouts:
  mixer.in_proj.weight [2I+2GZ+N, D] -> layers/mixer/in_proj [D, 2I+2GZ+N]  (z | x B C | dt)
  mixer.conv1d.weight [I+2GZ, 1, W] -> layers/mixer/conv [W, I+2GZ]     out_proj.weight [D, I] -> out_proj [I, D]
Mamba2 numerics differ from HF only in two corners: the residual stream stays in the compute dtype (HF keeps
it in f32 when residual_in_fp32, which matters for bf16 only), and Δ is clamped to time_step_limit in decode
steps too (HF clamps only in its chunked path; the default limit (0, inf) never binds).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from lmx.models.config import DTYPES, AttentionConfig, ModelConfig, RopeScaling, SSMConfig
from lmx.models.lm import build

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mamba2": "Mamba2ForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------- config


def _arch_of(hf: dict) -> str:
    """The model_type ("llama" | "qwen2" | "mamba2") of an HF config dict; ValueError for anything else."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    known = sorted(ARCHITECTURES.values())
    if archs:
        if len(archs) != 1 or archs[0] not in known:
            raise ValueError(f"unsupported architectures {archs}; lmx supports {known}")
        arch = next(t for t, a in ARCHITECTURES.items() if a == archs[0])
        if model_type is not None and model_type != arch:
            raise ValueError(f"config has architectures {archs} but model_type={model_type!r}")
        return arch
    if model_type in ARCHITECTURES:
        return model_type
    raise ValueError(
        f"unsupported model_type={model_type!r} (no 'architectures' field); lmx supports model types "
        f"{sorted(ARCHITECTURES)} ({known})"
    )


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):  # transformers 5: one dict per layer type
        kinds = {json.dumps(v, sort_keys=True) for v in rp.values()}
        if len(kinds) != 1:
            raise ValueError(f"per-layer-type rope_parameters {rp} are not supported (lmx uses one RoPE)")
        rp = dict(next(iter(rp.values())))
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(rp["factor"]))
    if kind == "llama3":
        orig = rp.get("original_max_position_embeddings",
                      hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
        low, high = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        return theta, RopeScaling("llama3", float(rp["factor"]), low, high, int(orig))
    raise ValueError(f"unsupported rope type {kind!r}; lmx supports 'default', 'linear' and 'llama3'")


def _sliding_window_from_qwen2(hf: dict, num_layers: int) -> int | None:
    """Qwen2 slides the window only on layers >= max_window_layers (or as `layer_types` says)."""
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
        return None
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
    ]
    if set(types) == {"full_attention"}:
        return None
    if set(types) != {"sliding_attention"}:
        raise ValueError(
            f"Qwen2 sliding window on only some layers (layer_types={types}) is not supported; lmx applies "
            "one window to every layer"
        )
    return int(hf["sliding_window"])


def _dtype_from_hf(hf: dict) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"checkpoint dtype {dtype!r} is not supported; lmx supports {DTYPES}")
    return dtype


def _mamba2_config_from_hf(hf: dict) -> ModelConfig:
    D, L = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
    expand = hf.get("expand", 2)
    if expand != int(expand):
        raise ValueError(f"expand={expand} is not supported (lmx needs an integer expand)")
    # transformers 5 writes inf as {"__float__": "Infinity"}
    limit = [float(v["__float__"]) if isinstance(v, dict) else float(v)
             for v in hf.get("time_step_limit") or (0.0, float("inf"))]
    ssm = SSMConfig(
        num_heads=int(hf["num_heads"]), head_dim=int(hf["head_dim"]), state_size=int(hf["state_size"]),
        n_groups=int(hf.get("n_groups", 8)), expand=int(expand), conv_width=int(hf.get("conv_kernel", 4)),
        chunk_size=int(hf.get("chunk_size", 256)), use_bias=bool(hf.get("use_bias", False)),
        use_conv_bias=bool(hf.get("use_conv_bias", True)), dt_limit=tuple(limit),
        dt_min=float(hf.get("time_step_min", 0.001)), dt_max=float(hf.get("time_step_max", 0.1)),
        dt_floor=float(hf.get("time_step_floor", 1e-4)),
    )
    dtype = _dtype_from_hf(hf)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=D, num_layers=L, layer_pattern=("ssm",) * L, ssm=ssm,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), dtype=dtype, param_dtype=dtype,
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from an HF `config.json` dict (Llama, Qwen2 or Mamba2). Unsupported options raise ValueError."""
    arch = _arch_of(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (lmx uses SwiGLU with silu)")
    if arch == "mamba2":
        return _mamba2_config_from_hf(hf)
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if arch == "llama" and hf.get("attention_bias", False):
        raise ValueError("Llama attention_bias=True is not supported (it adds an o_proj bias lmx lacks)")
    num_layers = int(hf["num_hidden_layers"])
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    theta, scaling = _rope_from_hf(hf)
    dtype = _dtype_from_hf(hf)
    attention = AttentionConfig(
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=arch == "qwen2",  # Qwen2 always has q/k/v biases (and no o_proj bias)
        sliding_window=_sliding_window_from_qwen2(hf, num_layers) if arch == "qwen2" else None,
    )
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=num_layers,
        mlp_dim=int(hf["intermediate_size"]),
        attention=attention,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        dtype=dtype,
        param_dtype=dtype,
    )


def _arch_name(arch: str) -> str:
    for model_type, cls in ARCHITECTURES.items():
        if arch in (model_type, cls):
            return model_type
    known = sorted(ARCHITECTURES) + sorted(ARCHITECTURES.values())
    raise ValueError(f"unsupported arch {arch!r}; choose one of {known}")


def _mamba2_config_to_hf(cfg: ModelConfig) -> dict:
    s = cfg.ssm
    return {
        "architectures": [ARCHITECTURES["mamba2"]], "model_type": "mamba2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_heads": s.num_heads,
        "head_dim": s.head_dim, "state_size": s.state_size, "n_groups": s.n_groups, "expand": s.expand,
        "conv_kernel": s.conv_width, "chunk_size": s.chunk_size, "use_bias": s.use_bias,
        "use_conv_bias": s.use_conv_bias, "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "time_step_limit": list(s.dt_limit), "time_step_min": s.dt_min,
        "time_step_max": s.dt_max, "time_step_floor": s.dt_floor, "residual_in_fp32": True,
        "rescale_prenorm_residual": False, "use_cache": True, "dtype": cfg.param_dtype,
        "max_position_embeddings": cfg.max_seq_len,  # not read by HF Mamba2; kept for the round trip
    }


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    """HF `config.json` dict for `arch` ("llama" | "qwen2" | "mamba2" or the class name). Raises ValueError when
    the architecture cannot represent `cfg` (variants, hybrids, qkv bias on Llama, sliding window on Llama, ...)."""
    arch = _arch_name(arch)
    for name in ("exits", "parscale", "recursion"):
        if getattr(cfg, name) is not None:
            raise ValueError(f"ModelConfig.{name} has no Hugging Face {ARCHITECTURES[arch]} equivalent")
    kind = "ssm" if arch == "mamba2" else "attn"
    if len(set(cfg.layer_pattern)) > 1:
        raise ValueError(f"layer_pattern {cfg.layer_pattern} mixes attention and SSM layers: no Hugging Face "
                         "architecture that lmx writes holds such hybrids")
    if set(cfg.layer_pattern) != {kind}:
        raise ValueError(f"layer_pattern {cfg.layer_pattern} has no Hugging Face {ARCHITECTURES[arch]} equivalent "
                         f"(it needs only {kind!r} layers)")
    if arch == "mamba2" and cfg.ssm.variant != "mamba2":
        raise ValueError(f"ssm.variant={cfg.ssm.variant!r} has no Hugging Face {ARCHITECTURES[arch]} equivalent")
    if arch == "mamba2":
        return _mamba2_config_to_hf(cfg)
    a = cfg.attention
    if arch == "llama" and (a.qkv_bias or a.sliding_window is not None):
        raise ValueError("LlamaForCausalLM has no qkv-only bias or sliding window; save with arch='qwen2'")
    if arch == "qwen2" and not a.qkv_bias:
        raise ValueError("Qwen2ForCausalLM always has q/k/v biases but attention.qkv_bias=False; use 'llama'")

    rope = {"rope_type": "default"}
    if a.rope_scaling is not None and a.rope_scaling.kind == "linear":
        rope = {"rope_type": "linear", "factor": a.rope_scaling.factor}
    elif a.rope_scaling is not None:
        s = a.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    hf = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": cfg.param_dtype,
        # Both layouts: transformers 5 reads rope_parameters, older versions rope_theta + rope_scaling.
        "rope_parameters": {**rope, "rope_theta": a.rope_theta},
        "rope_theta": a.rope_theta,
        "rope_scaling": None if a.rope_scaling is None else rope,
    }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        sliding = a.sliding_window is not None
        hf.update(use_sliding_window=sliding, sliding_window=a.sliding_window, max_window_layers=0,
                  layer_types=["sliding_attention" if sliding else "full_attention"] * cfg.num_layers)
    return hf


# ----------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Spec:
    """One HF tensor and its lmx counterpart. `linear`: a torch [out, in] weight, transposed to [in, out]
    and then reshaped; otherwise just reshaped. Per-layer specs hold `{i}` in `hf` and stack on axis 0."""

    lmx: str  # "/"-joined path in the params tree
    hf: str
    hf_shape: tuple[int, ...]
    lmx_shape: tuple[int, ...]  # per layer for layer specs
    linear: bool = False
    per_layer: bool = False

    def to_lmx(self, w):
        return (w.T if self.linear else w).reshape(self.lmx_shape)

    def to_hf(self, w):
        return w.reshape(self.hf_shape[::-1]).T if self.linear else w.reshape(self.hf_shape)


def _mamba2_specs(cfg: ModelConfig) -> list[_Spec]:
    V, D, s = cfg.vocab_size, cfg.d_model, cfg.ssm
    N, I, Y, W = s.num_heads, s.inner_dim, s.conv_dim, s.conv_width
    P = I + Y + N  # in_proj outputs: z, xBC, dt
    top = [_Spec("embed/embedding", "backbone.embeddings.weight", (V, D), (V, D)),
           _Spec("final_norm/scale", "backbone.norm_f.weight", (D,), (D,))]
    if not cfg.tie_embeddings:
        top.append(_Spec("lm_head", "lm_head.weight", (V, D), (D, V), linear=True))
    layer = [
        ("norm/scale", "norm.weight", (D,), (D,), False),
        ("mixer/in_proj", "mixer.in_proj.weight", (P, D), (D, P), True),
        ("mixer/conv", "mixer.conv1d.weight", (Y, 1, W), (W, Y), True),
        ("mixer/dt_bias", "mixer.dt_bias", (N,), (N,), False),
        ("mixer/A_log", "mixer.A_log", (N,), (N,), False),
        ("mixer/D", "mixer.D", (N,), (N,), False),
        ("mixer/norm/scale", "mixer.norm.weight", (I,), (I,), False),
        ("mixer/out_proj", "mixer.out_proj.weight", (D, I), (I, D), True),
    ]
    if s.use_conv_bias:
        layer.append(("mixer/conv_bias", "mixer.conv1d.bias", (Y,), (Y,), False))
    if s.use_bias:
        layer += [("mixer/in_proj_bias", "mixer.in_proj.bias", (P,), (P,), False),
                  ("mixer/out_proj_bias", "mixer.out_proj.bias", (D,), (D,), False)]
    p = "backbone.layers.{i}."
    return top + [_Spec("layers/" + lp, p + hn, hs, ls, lin, per_layer=True) for lp, hn, hs, ls, lin in layer]


def _specs(cfg: ModelConfig) -> list[_Spec]:
    if set(cfg.layer_pattern) == {"ssm"}:
        return _mamba2_specs(cfg)
    if set(cfg.layer_pattern) != {"attn"}:
        raise ValueError(f"layer_pattern {cfg.layer_pattern} has no Hugging Face checkpoint layout (hybrid)")
    V, D, F = cfg.vocab_size, cfg.d_model, cfg.mlp_dim
    a = cfg.attention
    N, K, H = a.num_heads, a.num_kv_heads, a.head_dim
    top = [_Spec("embed/embedding", "model.embed_tokens.weight", (V, D), (V, D)),
           _Spec("final_norm/scale", "model.norm.weight", (D,), (D,))]
    if not cfg.tie_embeddings:
        top.append(_Spec("lm_head", "lm_head.weight", (V, D), (D, V), linear=True))
    p = "model.layers.{i}."
    layer = [
        ("attn_norm/scale", "input_layernorm.weight", (D,), (D,), False),
        ("attn/q", "self_attn.q_proj.weight", (N * H, D), (D, N, H), True),
        ("attn/k", "self_attn.k_proj.weight", (K * H, D), (D, K, H), True),
        ("attn/v", "self_attn.v_proj.weight", (K * H, D), (D, K, H), True),
        ("attn/o", "self_attn.o_proj.weight", (D, N * H), (N, H, D), True),
        ("mlp_norm/scale", "post_attention_layernorm.weight", (D,), (D,), False),
        ("mlp/gate", "mlp.gate_proj.weight", (F, D), (D, F), True),
        ("mlp/up", "mlp.up_proj.weight", (F, D), (D, F), True),
        ("mlp/down", "mlp.down_proj.weight", (D, F), (F, D), True),
    ]
    if a.qkv_bias:
        layer += [("attn/q_bias", "self_attn.q_proj.bias", (N * H,), (N, H), False),
                  ("attn/k_bias", "self_attn.k_proj.bias", (K * H,), (K, H), False),
                  ("attn/v_bias", "self_attn.v_proj.bias", (K * H,), (K, H), False)]
    return top + [_Spec("layers/" + lp, p + hn, hs, ls, lin, per_layer=True) for lp, hn, hs, ls, lin in layer]


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for s in _specs(cfg):
        for i in range(cfg.num_layers) if s.per_layer else [None]:
            out[s.hf.format(i=i)] = s.hf_shape
    return out


def _mismatch_error(what: str, missing, unexpected, misshaped) -> ValueError | None:
    """One ValueError listing every problem, or None."""
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{what} does not match the config:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    for name, want, got in misshaped:
        lines.append(f"  mis-shaped: {name}: expected {tuple(want)}, got {tuple(got)}")
    return ValueError("\n".join(lines))


def _ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # non-persistent buffer some old checkpoints carry


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / SINGLE_FILE).exists():
        files = [path / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (lmx reads safetensors only)")
    absent = [str(f) for f in files if not f.exists()]
    if absent:
        raise FileNotFoundError(f"{path / INDEX_FILE} lists files that do not exist: {absent}")
    return files


def load_hf(path, dtype: str | None = None) -> tuple[nn.Module, dict]:
    """(model, params) from an HF checkpoint directory: `config.json` + `model.safetensors` or a sharded
    `model.safetensors.index.json`. `dtype` (e.g. "float32") overrides the compute and param dtype. Tensor
    names and shapes are checked against the config before any weight is read."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=dtype)

    with contextlib.ExitStack() as stack:
        handles = {}  # tensor name -> open safetensors file
        for f in _checkpoint_files(path):
            h = stack.enter_context(safe_open(f, framework="numpy"))
            handles.update({name: h for name in h.keys()})
        params = _read_params(cfg, path, handles)
    return build(cfg), params


def _read_params(cfg: ModelConfig, path: Path, handles) -> dict:
    found = {n: tuple(h.get_slice(n).get_shape()) for n, h in handles.items() if not _ignored(n)}
    want = _expected_hf_shapes(cfg)
    optional = {"lm_head.weight": (cfg.vocab_size, cfg.d_model)} if cfg.tie_embeddings else {}
    err = _mismatch_error(
        f"checkpoint {path}",
        missing=[n for n in want if n not in found],
        unexpected=[n for n in found if n not in want and n not in optional],
        misshaped=[(n, s, found[n]) for n, s in {**want, **optional}.items() if n in found and found[n] != s],
    )
    if err:
        raise err

    pd = jnp.dtype(cfg.param_dtype)
    read = lambda name: handles[name].get_tensor(name).astype(pd)  # bf16 arrives as an ml_dtypes array
    flat = {}
    for s in _specs(cfg):
        if s.per_layer:
            layers = [s.to_lmx(read(s.hf.format(i=i))) for i in range(cfg.num_layers)]
            flat[s.lmx] = jnp.asarray(np.stack(layers))
        else:
            flat[s.lmx] = jnp.asarray(s.to_lmx(read(s.hf)))
    return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------------------------- saving


def _hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (in cfg.param_dtype) from lmx params, after checking the params tree."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    specs = _specs(cfg)
    want = {s.lmx: ((cfg.num_layers,) if s.per_layer else ()) + s.lmx_shape for s in specs}
    err = _mismatch_error(
        "params",
        missing=[k for k in want if k not in flat],
        unexpected=[k for k in flat if k not in want],
        misshaped=[(k, s, flat[k].shape) for k, s in want.items() if k in flat and tuple(flat[k].shape) != s],
    )
    if err:
        raise err
    pd = jnp.dtype(cfg.param_dtype)
    out = {}
    for s in specs:
        w = np.asarray(jax.device_get(flat[s.lmx])).astype(pd)
        for i in range(cfg.num_layers) if s.per_layer else [None]:
            out[s.hf.format(i=i)] = np.ascontiguousarray(s.to_hf(w[i] if s.per_layer else w))
    return out


def _shards(tensors: dict[str, np.ndarray], shard_size_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """Greedy packing in name order; a tensor larger than the limit gets a shard of its own."""
    if shard_size_bytes is None:
        return [tensors]
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes={shard_size_bytes} must be > 0")
    shards, size = [{}], 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > shard_size_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def _write_checkpoint(out: Path, hf_config: dict, tensors: dict[str, np.ndarray], shard_size_bytes):
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _shards(tensors, shard_size_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_hf(model: nn.Module, params, path, arch: str | None = None, shard_size_bytes: int | None = None,
            overwrite: bool = False) -> Path:
    """Write `config.json` + safetensors (sharded with an index when `shard_size_bytes` is set) that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. `arch`: "llama" | "qwen2" | "mamba2"
    (default: mamba2 for SSM-only models, else qwen2 when the model has qkv bias, else llama).

    The checkpoint is written to a temporary sibling directory and renamed into place, so a failed save
    leaves `path` as it was. A non-empty `path` is refused unless `overwrite=True`, which replaces the
    whole directory (other files in it, e.g. a tokenizer, are removed)."""
    cfg = model.cfg
    if arch is None:
        arch = "mamba2" if set(cfg.layer_pattern) == {"ssm"} else "qwen2" if cfg.attention.qkv_bias else "llama"
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_hf: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        names = sorted(p.name for p in path.iterdir())
        raise FileExistsError(f"save_hf: {path} is not empty ({names[:5]}); pass overwrite=True to replace")
    hf_config = config_to_hf(cfg, arch)
    tensors = _hf_tensors(cfg, params)  # validates before anything touches the disk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_checkpoint(tmp, hf_config, tensors, shard_size_bytes)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if path.exists():  # swap: old -> backup, new -> path, drop backup
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, backup / "old")
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(backup / "old", path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
