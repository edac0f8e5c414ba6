"""dapo-rl: DAPO (arXiv 2503.14476) as a Ray RLlib algorithm.

``from dapo_rl import DAPOConfig`` gives the algorithm's config. Importing this package registers
``"DAPO"`` with Tune, so ``tune.Tuner("DAPO", param_space=config, ...)`` works.

``dapo_rl.core`` (the math), ``dapo_rl.models.loading``, ``dapo_rl.models.policy`` and ``dapo_rl.rollout`` never
import Ray: on a machine without Ray (a GPU box, say) they import and run, and only the RLlib parts
(``DAPO``, ``DAPOConfig``) are missing.
"""

import importlib.util

from dapo_rl.versions import version as _version

#: The installed version (pyproject's ``version``, read from the package metadata).
__version__ = _version()

__all__ = ["__version__"]

if importlib.util.find_spec("ray") is not None:
    from ray import tune

    from dapo_rl.rllib.dapo import DAPO, DAPOConfig

    tune.register_trainable("DAPO", DAPO)
    __all__ += ["DAPO", "DAPOConfig"]
