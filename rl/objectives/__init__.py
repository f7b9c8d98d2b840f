"""Registered policy objectives (rl.objectives.base explains the interface). Importing the
package registers every built-in objective and the estimators they bring."""

from rl.objectives.base import (OBJECTIVES, Objective, PolicyLossInputs, PolicyLossOutput, clipped_surrogate,
                                get_objective, k3_kl)
from rl.objectives import diffu_grpo, espo, spg, trajectory, wd1  # noqa: F401  (registers)
from rl import block_diffusion  # noqa: F401,E402  (registers the block-causal estimators)

__all__ = ["OBJECTIVES", "Objective", "PolicyLossInputs", "PolicyLossOutput", "clipped_surrogate",
           "get_objective", "k3_kl"]
