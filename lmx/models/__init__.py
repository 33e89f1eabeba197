"""Models: configs, the decoder LM (attention, Mamba-2, Mamba-3 and hybrids), its variants (early exits, ParScale,
relaxed recursion), decode state, Hugging Face interop."""

from lmx.models.attention import KVState
from lmx.models.config import AttentionConfig, ModelConfig, RopeScaling, SSMConfig, preset, preset_names
from lmx.models.early_exit import ExitConfig
from lmx.models.hf import config_from_hf, config_to_hf, load_hf, save_hf
from lmx.models.lm import (
    LM,
    Ctx,
    DecodeParams,
    LMOutput,
    build,
    check_tokens,
    decode_params,
    embed,
    forward,
    head,
    init_params,
    make_ctx,
    run_layers,
)
from lmx.models.mamba3 import Mamba3LayerState, Mamba3Pending
from lmx.models.parscale import ParScaleConfig, add_parscale_params, parscale_only
from lmx.models.quantize import QuantizedWeight, quantize_params
from lmx.models.recursive import RecursionConfig, from_base
from lmx.models.ssm import Mamba2LayerState, Mamba2Pending
from lmx.models.state import DecodeState, init_state, repeat, select, truncate

__all__ = [
    "AttentionConfig", "ModelConfig", "RopeScaling", "SSMConfig", "preset", "preset_names",
    "config_from_hf", "config_to_hf", "load_hf", "save_hf",
    "LM", "Ctx", "DecodeParams", "LMOutput", "build", "check_tokens", "decode_params", "embed", "forward", "head",
    "init_params", "make_ctx", "run_layers",
    "DecodeState", "KVState", "Mamba2LayerState", "Mamba2Pending", "Mamba3LayerState", "Mamba3Pending", "init_state",
    "repeat", "select", "truncate",
    "ExitConfig", "ParScaleConfig", "RecursionConfig", "add_parscale_params", "parscale_only", "from_base",
    "QuantizedWeight", "quantize_params",
]
