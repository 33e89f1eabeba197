"""Decoding: samplers, the jitted generate loop, speculative decoding, and compute accounting."""

from lmx.decoding.generate import AllFinished, Generation, MOfRFinished, generate
from lmx.decoding.sampling import Greedy, Sampler, process_logits, sample, token_logprobs
from lmx.decoding.speculative import SelfDraft, speculative_generate

__all__ = [
    "AllFinished", "Generation", "MOfRFinished", "generate",
    "Greedy", "Sampler", "process_logits", "sample", "token_logprobs",
    "SelfDraft", "speculative_generate",
]
