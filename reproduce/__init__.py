"""Reproducing the DAPO paper's Table 1 with dapo_rl.

- :mod:`reproduce.settings`: the paper's 32B run as ``DAPOConfig`` objects (variants ``"paper"`` and
  ``"reference-script"``), its AIME 2024 evaluation, the six cumulative Table-1 rows and the published
  scores.
- :mod:`reproduce.scales`: the scales a row can run at (``"paper"``, ``"gpu"``, ``"tiny"``), applied to
  any row with ``apply_scale``, and the paper scale's resource plan.
"""
