"""FSDP2 without Ray: two CPU processes (gloo) sharding the tiny Qwen2 give the update of one process.

Each worker process shards the model (rank 1 from the meta device, its shards broadcast from rank 0),
runs one AdamW step on its half of a batch, gathers the full weights, and round-trips a sharded
checkpoint. The loss is the learner's own (``DAPOTorchLearner.compute_loss_for_module``: the
mini-batch's global token-mean normaliser, times the world size because FSDP2 averages gradients),
so the learner's scaling is what makes the two processes' update the single process's. The parent
compares against the same step taken unsharded (world size 1: no scaling).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dapo_rl.models.distributed import (
    clip_gradients_by_global_norm,
    full_state_dict,
    is_sharded,
    load_sharded,
    save_sharded,
    shard_causal_lm,
    shard_from_rank0,
    transformer_blocks,
)
from dapo_rl.models.loading import load_policy
from dapo_rl.models.policy import ResponseLogprobs
from dapo_rl.rollout.batch import pack_sequences

WORLD = 2
LR = 1e-2
MAX_NORM = 0.5  # small enough that clipping acts


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (5, 3, 7, 4)]
    responses = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (6, 2, 9, 1)]
    batch = pack_sequences(prompts, responses, pad_token_id=0)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])
    batch["old_logprobs"] = torch.full(batch["response_mask"].shape, -5.3)
    return batch


def _learner_loss(logprobs: torch.Tensor, batch: dict[str, torch.Tensor], normalizer: float) -> torch.Tensor:
    """The loss DAPOTorchLearner backpropagates for this (shard of a) mini-batch: the learner's own
    ``compute_loss_for_module``, world-size scaling under torch.distributed included."""
    from dapo_rl.rllib.learner import DAPOTorchLearner  # imports RLlib's Learner classes; starts no Ray

    rows, width = batch["response_mask"].shape
    config = SimpleNamespace(
        loss_agg="token-mean",
        max_response_length=width,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=None,
        kl_coef=0.0,  # DAPO's: no KL term
        kl_estimator="k3",
        kl_placement="loss",
    )
    learner_batch = {
        "token_mask": batch["response_mask"],
        "loss_normalizer": torch.full((rows,), normalizer),  # the global count, on every row
        "advantages": batch["advantages"],
        "old_logprobs": batch["old_logprobs"],
    }
    learner = SimpleNamespace(_loss_parts=[])  # the only learner state the loss touches
    return DAPOTorchLearner.compute_loss_for_module(
        learner, module_id="default_policy", config=config, batch=learner_batch, fwd_out={"logprobs": logprobs}
    )


def _step(model: torch.nn.Module, wrapper: ResponseLogprobs, rows: slice, normalizer: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    batch = {key: value[rows] for key, value in _batch().items()}
    logprobs, _ = wrapper(batch)
    _learner_loss(logprobs, batch, normalizer).backward()
    norm = clip_gradients_by_global_norm([p.grad for p in model.parameters()], MAX_NORM)
    optimizer.step()
    return optimizer, norm


def _worker(rank: int, port: int, folder: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        # Rank 1 builds on the meta device and receives its shards from rank 0's weights.
        model, _ = load_policy("tiny-qwen2", seed=0, on_meta=rank != 0)
        assert next(model.parameters()).is_meta == (rank != 0)
        wrapper = ResponseLogprobs(model)
        shard_from_rank0(wrapper, model, "cpu")
        assert is_sharded(model) and not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        total_tokens = float(_batch()["response_mask"].sum())
        optimizer, norm = _step(model, wrapper, slice(2 * rank, 2 * rank + 2), total_tokens)
        weights = full_state_dict(model)
        save_sharded(model, optimizer, folder)

        # A fresh sharded copy (different init) loads the checkpoint back.
        fresh, _ = load_policy("tiny-qwen2", seed=1)
        fresh_wrapper = ResponseLogprobs(fresh)
        shard_causal_lm(fresh_wrapper, fresh)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=LR, weight_decay=0.1)
        load_sharded(fresh, fresh_optimizer, folder)
        reloaded = full_state_dict(fresh)
        # Adam's moments came back too: the next step from both copies is the same.
        for copy, copy_optimizer in ((model, optimizer), (fresh, fresh_optimizer)):
            for parameter in copy.parameters():
                parameter.grad = torch.ones_like(parameter)
            copy_optimizer.step()
        after_step = (full_state_dict(model), full_state_dict(fresh))
        if rank == 0:
            results.update(weights=weights, reloaded=reloaded, norm=norm, after_step=after_step)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, free_port):
    folder = str(tmp_path_factory.mktemp("fsdp") / "checkpoint")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(free_port, folder, results), nprocs=WORLD, join=True)
        return dict(results)


def test_fsdp2_two_processes_give_the_single_process_update(sharded_run):
    model, _ = load_policy("tiny-qwen2", seed=0)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    total_tokens = float(_batch()["response_mask"].sum())
    _, norm = _step(model, ResponseLogprobs(model), slice(0, 4), total_tokens)
    expected = model.state_dict()
    gathered = sharded_run["weights"]
    assert set(gathered) == set(expected)
    assert norm > MAX_NORM  # clipping acted, on the norm reduced over shards
    assert sharded_run["norm"] == pytest.approx(norm, rel=1e-5)
    moved = max(float((expected[name] - before[name]).abs().max()) for name in expected)
    assert moved > 1e-3  # the step did something (about lr)
    difference = max(float((gathered[name] - expected[name]).abs().max()) for name in expected)
    assert difference < 1e-5


def test_sharded_checkpoint_restores_weights_and_optimizer(sharded_run):
    weights, reloaded = sharded_run["weights"], sharded_run["reloaded"]
    assert all(torch.equal(weights[name], reloaded[name]) for name in weights)
    continued, from_checkpoint = sharded_run["after_step"]
    assert all(torch.equal(continued[name], from_checkpoint[name]) for name in continued)


def test_transformer_blocks_finds_the_decoder_layers():
    model, _ = load_policy("tiny-qwen2", seed=0)
    blocks = transformer_blocks(model)
    assert [type(block).__name__ for block in blocks] == ["Qwen2DecoderLayer"] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="_no_split_modules"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_load_sharded_names_a_missing_checkpoint(tmp_path):
    model, _ = load_policy("tiny-qwen2", seed=0)
    with pytest.raises(FileNotFoundError, match=r"\.metadata"):
        load_sharded(model, torch.optim.AdamW(model.parameters()), tmp_path / "nothing")


def test_clip_by_global_norm_matches_torch():
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(3, 4, generator=generator), None, torch.randn(5, generator=generator)]
    reference = [g.clone() for g in gradients if g is not None]
    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for parameter, gradient in zip(parameters, reference):
        parameter.grad = gradient.clone()
    expected_norm = float(torch.nn.utils.clip_grad_norm_(parameters, 1.0))
    norm = clip_gradients_by_global_norm(gradients, 1.0)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    present = [g for g in gradients if g is not None]
    for parameter, gradient in zip(parameters, present):
        assert torch.allclose(parameter.grad, gradient, rtol=1e-5, atol=1e-7)
