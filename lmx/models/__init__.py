"""Models: configs, the decoder LM (attention, Mamba-2 and hybrids), decode state, Hugging Face interop."""

from lmx.models.config import AttentionConfig, ModelConfig, RopeScaling, SSMConfig, preset, preset_names
from lmx.models.hf import config_from_hf, config_to_hf, load_hf, save_hf
from lmx.models.lm import LM, LMOutput, build, check_tokens, init_params, unstack_layers
from lmx.models.state import DecodeState, KVCache, SSMCache, SSMPending, init_state, repeat, select, truncate

__all__ = [
    "AttentionConfig", "ModelConfig", "RopeScaling", "SSMConfig", "preset", "preset_names",
    "config_from_hf", "config_to_hf", "load_hf", "save_hf",
    "LM", "LMOutput", "build", "check_tokens", "init_params",
    "unstack_layers", "DecodeState", "KVCache", "SSMCache", "SSMPending", "init_state", "repeat", "select", "truncate",
]
