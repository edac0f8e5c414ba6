"""The RLlib layer: the algorithm and the Ray actors it drives.

dapo          DAPOConfig (settings, validate) and DAPO (setup, training_step), as RLlib's ppo.py
learner       DAPOTorchLearner: the token-level decoupled-clip loss on a mini-batch
module        CausalLMModule: the policy as an RLModule
env_runner    DAPOEnvRunner: generation and scoring on a Ray actor
sampling      rounds from the remote env runners (synchronous, asynchronous, a dead runner's share resent)
run_state     the run's counters and generators, saved and restored in one place
weights       weight sync from the learners to the runners and engines
checkpoints   checkpoint manifests and the policy's module config
"""
