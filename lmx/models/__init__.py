"""Models: configs, the decoder LM (attention, Mamba-2, Mamba-3 and hybrids), decode state, Hugging Face interop."""

from lmx.models.config import AttentionConfig, ModelConfig, RopeScaling, SSMConfig, preset, preset_names
from lmx.models.hf import config_from_hf, config_to_hf, load_hf, save_hf
from lmx.models.lm import LM, LMOutput, build, check_tokens, init_params, unstack_layers
from lmx.models.state import (
    DecodeState,
    KVCache,
    Mamba3Cache,
    Mamba3Pending,
    SSMCache,
    SSMPending,
    init_state,
    repeat,
    select,
    truncate,
)

__all__ = [
    "AttentionConfig", "ModelConfig", "RopeScaling", "SSMConfig", "preset", "preset_names",
    "config_from_hf", "config_to_hf", "load_hf", "save_hf",
    "LM", "LMOutput", "build", "check_tokens", "init_params", "unstack_layers",
    "DecodeState", "KVCache", "Mamba3Cache", "Mamba3Pending", "SSMCache", "SSMPending", "init_state", "repeat",
    "select", "truncate",
]
