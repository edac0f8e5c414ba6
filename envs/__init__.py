"""dapo_envs: reasoning environments (being built)."""
