"""Training: TrainState, optimizer, SFT losses and train step, checkpoints, metrics, the SFT loop; RL: the GRPO
family's losses and advantages (`rl`), rewards (`rewards`), one RL step (`rl_loop`), TreePO segment-tree rollouts
(`treepo`) and the RL run (`rl_train`)."""

from lmx.train import rewards, rl, treepo
from lmx.train.checkpoint import Checkpointer
from lmx.train.loop import TrainResult, model_config, train
from lmx.train.metrics import MetricsWriter, read_metrics
from lmx.train.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from lmx.train.rl_loop import RLConfig, make_policy_loss, rl_step
from lmx.train.rl_train import RLResult, train_rl
from lmx.train.sft import (
    LossFn,
    distill_loss,
    evaluate,
    make_distill_loss,
    make_train_step,
    masked_cross_entropy,
    sft_loss,
)
from lmx.train.state import TrainState, abstract_state, state_shardings
from lmx.train.treepo import TreeConfig, tree_rollout

__all__ = [
    "Checkpointer", "LossFn", "MetricsWriter", "OptimConfig", "TrainState", "abstract_state", "decay_mask",
    "distill_loss", "evaluate", "lr_schedule", "make_distill_loss", "make_optimizer", "make_train_step",
    "masked_cross_entropy", "model_config", "read_metrics", "sft_loss", "state_shardings", "train", "TrainResult",
    "rewards", "rl", "RLConfig", "make_policy_loss", "rl_step", "RLResult", "train_rl", "treepo", "TreeConfig",
    "tree_rollout",
]
