"""dapo-rl: DAPO as a Ray RLlib algorithm.

``dapo_rl.core`` is pure torch and never imports Ray.
"""

__version__ = "0.1.0"
