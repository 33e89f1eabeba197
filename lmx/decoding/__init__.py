"""Decoding: samplers, the jitted generate loop, speculative decoding, test-time scaling, latent reasoning, and
compute accounting."""

from lmx.decoding.budget import BudgetForcing, no_thinking_prompts
from lmx.decoding.early_exit import EarlyExit, early_exit_generate
from lmx.decoding.generate import AllFinished, Generation, MOfRFinished, Stepper, generate
from lmx.decoding.latent import SoftThinking, ThinkRouter, latent_generate
from lmx.decoding.sampling import Greedy, Sampler, process_logits, sample, token_logprobs
from lmx.decoding.scaling import (
    METHODS,
    ScalingResult,
    WeibullMixture,
    best_of_majority,
    best_of_n,
    first_finish,
    fit_weibull_mixture,
    majority_vote,
    rpc,
    run_method,
    short_m_at_k,
    verifier_scorer,
    weighted_majority,
)
from lmx.decoding.search import (
    AStarGeneration,
    BeamGeneration,
    ParticleGeneration,
    astar_search,
    beam_search,
    particle_filter,
)
from lmx.decoding.speculative import SelfDraft, speculative_generate

__all__ = [
    "AllFinished", "Generation", "MOfRFinished", "Stepper", "generate", "EarlyExit", "early_exit_generate",
    "Greedy", "Sampler", "process_logits", "sample", "token_logprobs",
    "METHODS", "ScalingResult", "WeibullMixture", "best_of_majority", "best_of_n", "first_finish",
    "fit_weibull_mixture", "majority_vote", "rpc", "run_method", "short_m_at_k", "verifier_scorer",
    "weighted_majority",
    "AStarGeneration", "BeamGeneration", "ParticleGeneration", "astar_search", "beam_search", "particle_filter",
    "SelfDraft", "speculative_generate",
    "BudgetForcing", "no_thinking_prompts",
    "SoftThinking", "ThinkRouter", "latent_generate",
]
