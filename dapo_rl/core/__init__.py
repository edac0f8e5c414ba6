"""DAPO's math as pure torch functions over ``(batch, tokens)`` tensors with a mask.

Nothing here imports Ray: these functions are what any LLM-RL system can reuse, and they run on
machines (a lent GPU, say) where Ray is not installed.
"""

from dapo_rl.core.advantages import ADVANTAGE_SCALES, group_advantages
from dapo_rl.core.kl import (
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    kl_loss,
    kl_penalized_rewards,
    kl_penalty,
    register_kl_estimator,
)
from dapo_rl.core.logprobs import token_logprobs
from dapo_rl.core.losses import LOSS_AGGREGATIONS, loss_normalizer, policy_loss, register_loss_aggregation
from dapo_rl.core.sampling import DynamicSamplingAccumulator, SamplingRoundLimitError, select_informative_groups
from dapo_rl.core.shaping import overlong_mask, shaped_rewards, soft_overlong_penalty

__all__ = [
    "ADVANTAGE_SCALES",
    "LOSS_AGGREGATIONS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "DynamicSamplingAccumulator",
    "SamplingRoundLimitError",
    "group_advantages",
    "kl_loss",
    "kl_penalized_rewards",
    "kl_penalty",
    "loss_normalizer",
    "overlong_mask",
    "policy_loss",
    "register_kl_estimator",
    "register_loss_aggregation",
    "select_informative_groups",
    "shaped_rewards",
    "soft_overlong_penalty",
    "token_logprobs",
]
