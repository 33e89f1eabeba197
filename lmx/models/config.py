"""Model configuration: one frozen dataclass with nested frozen sub-configs, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

LAYER_KINDS = ("attn", "ssm")
SSM_VARIANTS = ("mamba2", "mamba3")  # the mixer of "ssm" layers: lmx.models.ssm / lmx.models.mamba3
MAMBA3_ROPES = (None, "interleaved", "halves")
ROPE_SCALINGS = (None, "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def repeating_unit(pattern: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest prefix that tiles `pattern`: ("ssm", "attn") for ("ssm", "attn") * 3."""
    return next(pattern[:p] for p in range(1, len(pattern) + 1) if pattern == pattern[:p] * (len(pattern) // p))


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind="linear": positions / factor. kind="llama3": Llama-3.1 band-wise scaling."""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        _check(self.kind in ("linear", "llama3"), f"rope_scaling.kind={self.kind!r} must be 'linear' or 'llama3'")
        _check(self.factor > 0, f"rope_scaling.factor={self.factor} must be > 0")
        if self.kind == "llama3":
            _check(
                self.high_freq_factor > self.low_freq_factor,
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}",
            )


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    sliding_window: int | None = None  # keys further back than this many positions are masked
    impl: str = "xla"  # kernel choice, see lmx.pallas

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _check(getattr(self, name) > 0, f"attention.{name}={getattr(self, name)} must be > 0")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"attention.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        _check(self.head_dim % 2 == 0, f"attention.head_dim={self.head_dim} must be even (RoPE)")
        _check(self.rope_theta > 0, f"attention.rope_theta={self.rope_theta} must be > 0")
        _check(
            self.sliding_window is None or self.sliding_window > 0,
            f"attention.sliding_window={self.sliding_window} must be None or > 0",
        )
        _check(self.impl in ("xla", "auto", "pallas"), f"attention.impl={self.impl!r} must be xla|auto|pallas")


@dataclass(frozen=True)
class SSMConfig:
    """The mixer of "ssm" layers. variant="mamba2": Mamba-2 (SSD) as in `transformers` Mamba2; B and C are shared
    by groups of num_heads / n_groups heads. variant="mamba3": lmx.models.mamba3.Mamba3Mixer (trapezoidal update,
    rotary state, MIMO rank M; no conv, one group), as in `mamba_ssm/modules/mamba3.py`. For both, the inner
    width N·H must equal expand·d_model (the reference's d_inner = expand·d_model, nheads = d_inner / headdim).
    Fields of one variant (listed in VARIANT_FIELDS) must keep their defaults under the other: a set option that
    would silently do nothing is an error."""

    variant: str = "mamba2"
    num_heads: int = 8  # N
    head_dim: int = 16  # H
    state_size: int = 16  # Z
    n_groups: int = 1  # U: groups sharing B and C
    expand: int = 2
    conv_width: int = 4  # W: causal depthwise conv over x, B, C
    chunk_size: int = 64  # C: block size of the chunked SSD scan (prefill, training)
    use_bias: bool = False  # in_proj / out_proj bias
    use_conv_bias: bool = True
    dt_limit: tuple[float, float] = (0.0, float("inf"))  # clamp of softplus(dt + dt_bias)
    dt_min: float = 0.001  # dt_bias init: softplus(dt_bias) log-uniform in [dt_min, dt_max], >= dt_floor
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    rollback_window: int = 4  # decode steps `truncate` can undo (see lmx.models.state); 0 disables
    impl: str = "xla"  # kernel choice for the chunked scan, see lmx.pallas
    # Mamba-3 only.
    mimo_rank: int = 1  # M: rank of the per-head input/output projections (1 = SISO)
    rope_fraction: float = 0.5  # share of the Z state channels that rotate: A = int(Z·rope_fraction) // 2 angles
    rope: str | None = None  # rotary pairs: "interleaved" (2j, 2j+1) or "halves" (j, j+Z/2); None: by mimo_rank
    A_floor: float = 1e-4  # A = min(-f(·), -A_floor), f the reference heavy tail: every step decays at least this much

    VARIANT_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "mamba2": ("n_groups", "conv_width", "use_bias", "use_conv_bias", "dt_limit"),
        "mamba3": ("mimo_rank", "rope_fraction", "rope", "A_floor"),
    }

    def __post_init__(self):
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        _check(self.variant in SSM_VARIANTS, f"ssm.variant={self.variant!r} must be one of {SSM_VARIANTS}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for variant, names in self.VARIANT_FIELDS.items():
            for name in names:
                value = getattr(self, name)
                _check(variant == self.variant or value == defaults[name],
                       f"ssm.{name}={value!r} is a {variant} option (no effect with variant={self.variant!r}); "
                       f"leave it at {defaults[name]!r}")
        for name in ("num_heads", "head_dim", "state_size", "n_groups", "expand", "chunk_size"):
            _check(getattr(self, name) > 0, f"ssm.{name}={getattr(self, name)} must be > 0")
        _check(self.conv_width >= 2, f"ssm.conv_width={self.conv_width} must be >= 2")
        _check(
            self.num_heads % self.n_groups == 0,
            f"ssm.n_groups={self.n_groups} must divide ssm.num_heads={self.num_heads}",
        )
        ok = len(self.dt_limit) == 2 and 0 <= self.dt_limit[0] < self.dt_limit[1]
        _check(ok, f"ssm.dt_limit={self.dt_limit} must be (low, high) with 0 <= low < high")
        _check(0 < self.dt_min <= self.dt_max, f"ssm.dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < min <= max")
        _check(self.rollback_window >= 0, f"ssm.rollback_window={self.rollback_window} must be >= 0")
        _check(self.impl in ("xla", "auto", "pallas"), f"ssm.impl={self.impl!r} must be xla|auto|pallas")
        if self.variant == "mamba3":
            _check(self.impl != "pallas", "ssm.impl='pallas': there is no Mamba-3 kernel; use 'xla' or 'auto'")
            _check(self.mimo_rank >= 1, f"ssm.mimo_rank={self.mimo_rank} must be >= 1")
            _check(self.state_size % 2 == 0, f"ssm.state_size={self.state_size} must be even for mamba3 (rotary pairs)")
            _check(0 < self.rope_fraction <= 1 and self.num_angles >= 1,
                   f"ssm.rope_fraction={self.rope_fraction} must be in (0, 1] and give at least one rotary angle "
                   f"(int(state_size * rope_fraction) // 2 >= 1) for state_size={self.state_size}")
            _check(self.rope in MAMBA3_ROPES, f"ssm.rope={self.rope!r} must be one of {MAMBA3_ROPES}")
            _check(self.A_floor >= 0, f"ssm.A_floor={self.A_floor} must be >= 0")

    @property
    def num_angles(self) -> int:
        """Mamba-3 rotary angles per head (A): state channel pairs that rotate."""
        return int(self.state_size * self.rope_fraction) // 2

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x (N·H), then B and C (G·Z each)."""
        return self.inner_dim + 2 * self.n_groups * self.state_size


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128
    d_model: int = 64
    num_layers: int = 2
    mlp_dim: int = 256
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    layer_pattern: tuple[str, ...] | None = None  # None: ("attn",) * num_layers
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False
    ssm: SSMConfig | None = None  # required when layer_pattern has "ssm" layers
    # Variant blocks (None = off); filled in by later capabilities.
    exits: object | None = None
    parscale: object | None = None
    recursion: object | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "mlp_dim", "max_seq_len"):
            _check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        _check(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {DTYPES}")
        _check(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r} must be one of {DTYPES}")
        if self.layer_pattern is None:
            object.__setattr__(self, "layer_pattern", ("attn",) * self.num_layers)
        object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        _check(
            len(self.layer_pattern) == self.num_layers,
            f"layer_pattern has {len(self.layer_pattern)} entries but num_layers={self.num_layers}",
        )
        bad = [k for k in self.layer_pattern if k not in LAYER_KINDS]
        _check(not bad, f"layer_pattern has unknown kinds {bad}; known: {LAYER_KINDS}")
        if "ssm" in self.layer_pattern:
            s = self.ssm
            _check(isinstance(s, SSMConfig), f"layer_pattern has 'ssm' layers, so ssm must be an SSMConfig, got {s!r}")
            _check(
                s.inner_dim == s.expand * self.d_model,
                f"ssm.num_heads * ssm.head_dim = {s.num_heads} * {s.head_dim} = {s.inner_dim} must equal the inner "
                f"width ssm.expand * d_model = {s.expand} * {self.d_model} = {s.expand * self.d_model}",
            )

    @property
    def num_attn_layers(self) -> int:
        return sum(k == "attn" for k in self.layer_pattern)

    @property
    def num_ssm_layers(self) -> int:
        return sum(k == "ssm" for k in self.layer_pattern)

    def replace(self, **kw) -> ModelConfig:
        """dataclasses.replace, but a new num_layers re-tiles the layer pattern's repeating unit."""
        if "num_layers" in kw and "layer_pattern" not in kw:
            n, unit = kw["num_layers"], repeating_unit(self.layer_pattern)
            if n % len(unit):
                raise ValueError(f"num_layers={n} is not a multiple of the layer_pattern unit {unit}")
            kw["layer_pattern"] = unit * (n // len(unit))
        return dataclasses.replace(self, **kw)


_PRESETS: dict[str, ModelConfig] = {
    # Tiny configs for tests and CPU demos.
    "llama-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, mlp_dim=192,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
    ),
    "llama3-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, mlp_dim=192, norm_eps=1e-5,
        attention=AttentionConfig(
            num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=500000.0,
            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
        ),
    ),
    "qwen2-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, mlp_dim=192, tie_embeddings=True,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, qkv_bias=True),
    ),
    "swa-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, mlp_dim=192,
        attention=AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=16, sliding_window=8),
    ),
    # Mamba-2 (like HF Mamba2ForCausalLM: SSM blocks only, no MLP), and a hybrid: three SSM blocks per
    # attention + MLP block, the 4-layer unit scanned twice.
    "mamba2-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, layer_pattern=("ssm",) * 2, norm_eps=1e-5,
        ssm=SSMConfig(num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=8),
    ),
    # Mamba-3 (SSM blocks only, like mamba2-tiny); chunk 4 so short test sequences span several chunks.
    "mamba3-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, layer_pattern=("ssm",) * 2, norm_eps=1e-5,
        ssm=SSMConfig(variant="mamba3", num_heads=8, head_dim=16, state_size=16, chunk_size=4),
    ),
    "hybrid-tiny": ModelConfig(
        vocab_size=128, d_model=64, num_layers=8, mlp_dim=192, layer_pattern=("ssm", "ssm", "ssm", "attn") * 2,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
        ssm=SSMConfig(num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=8),
    ),
    # Real architectures (shapes only; weights come from load_hf).
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, d_model=2048, num_layers=16, mlp_dim=8192, norm_eps=1e-5, tie_embeddings=True,
        max_seq_len=131072, dtype="bfloat16", param_dtype="bfloat16",
        attention=AttentionConfig(
            num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
            rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        ),
    ),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, d_model=896, num_layers=24, mlp_dim=4864, tie_embeddings=True,
        max_seq_len=32768, dtype="bfloat16", param_dtype="bfloat16",
        attention=AttentionConfig(num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True),
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named config, optionally with top-level fields replaced."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}")
    cfg = _PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def preset_names() -> list[str]:
    return sorted(_PRESETS)
