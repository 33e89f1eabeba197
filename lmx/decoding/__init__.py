"""Decoding: samplers, the jitted generate loop, and compute accounting."""

from lmx.decoding.generate import AllFinished, Generation, MOfRFinished, generate
from lmx.decoding.sampling import Greedy, Sampler, process_logits, sample, token_logprobs

__all__ = [
    "AllFinished", "Generation", "MOfRFinished", "generate",
    "Greedy", "Sampler", "process_logits", "sample", "token_logprobs",
]
