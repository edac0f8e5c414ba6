"""Generation, Ray-free: G responses per prompt from a backend (Hugging Face ``generate`` or vLLM),
scored by the environment's verifier, packed into the columns the learner reads.

    base            the backend interface and sampling settings
    hf, vllm_*      the two backends; vLLM's weight transfer (NCCL, by value) and worker extension
    runner          GenerationRunner: prompts -> groups of scored (multi-turn) episodes
    batch           packing prompts and responses into padded token tensors
    prompt_sampler  the order problems are drawn in, epoch by epoch
    weight_sync, engine_sync
                    what crosses from the learners to the engines, and how
"""
