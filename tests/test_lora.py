"""LoRA policies through peft (issue 28): only the adapters train and sit in the optimizer; the base
weights stay bit-identical; generators get the merged weights; checkpoints hold and restore the
adapters; the export writes an adapter folder and a merged Hugging Face folder that generate alike;
with the KL penalty the reference is the same model with its adapters off (no second copy)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from dapo_rl.models.lora import is_adapter_key, merged_state_dict
from dapo_rl.rllib.dapo import InvalidConfigError
from tests.helpers import built_algo, make_config, unequal_minibatch

peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "dropout": 0.0}


def lora_config(**training):
    config = make_config(overlong_filter=False, **training)
    return config.rl_module(model_config={"model": "tiny-qwen2", "lora": LORA})


def learner_module(algo):
    return algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"r": 0}, "model_config['lora']['r'] must be an integer >= 1, got 0"),
        ({"rank": 8}, "model_config['lora'] has unknown key(s) ['rank']"),
        ({"dropout": 1.0}, "model_config['lora']['dropout'] must be in [0, 1), got 1.0"),
        ({"target_modules": []}, "model_config['lora']['target_modules'] must be 'all-linear' or a non-empty list"),
        ({"target_modules": ["q_proj", "lm_head"]}, "names the output head ['lm_head']"),
        ("yes", "model_config['lora'] must be a dict"),
    ],
)
def test_lora_settings_are_refused_by_value(lora, message):
    config = make_config().rl_module(model_config={"model": "tiny-qwen2", "lora": lora})
    with pytest.raises(InvalidConfigError) as raised:
        config.validate()
    assert message in str(raised.value)


def test_unverified_lora_combinations_are_refused():
    gpu_engines = lora_config(generation_backend="vllm").env_runners(num_env_runners=1, num_gpus_per_env_runner=1)
    with pytest.raises(InvalidConfigError, match="generation_backend='vllm' on GPU engines"):
        gpu_engines.validate_settings(require_installed=False)
    # CPU engines take the merged weights (tests/test_vllm_training.py): not refused for LoRA.
    cpu_engines = lora_config(generation_backend="vllm").env_runners(num_env_runners=1)
    cpu_engines.validate_settings(require_installed=False)
    with pytest.raises(InvalidConfigError, match="data_parallel='fsdp2' and num_learners > 1 is not verified"):
        lora_config(data_parallel="fsdp2").learners(num_learners=2).validate()
    lora_config().validate()
    make_config().rl_module(model_config={"model": "tiny-qwen2", "lora": {}}).validate()  # the defaults


def test_lora_is_a_job_key_that_reaches_the_module_config(tmp_path):
    from dapo_rl.jobs import JobError, build_config, load_job

    job_file = tmp_path / "job.yaml"
    job_file.write_text("lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n", encoding="utf-8")
    job = load_job(job_file, [])
    assert build_config(job, job["model"]).model_config["lora"] == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert "lora" not in build_config(load_job(None, []), "tiny-qwen2").model_config  # default: full fine-tuning
    with pytest.raises((JobError, InvalidConfigError), match=r"model_config\['lora'\]\['r'\] must be an integer >= 1"):
        build_config(load_job(None, ["lora={r: 0}"]), "tiny-qwen2")


@pytest.fixture(scope="module")
def trained(ray_session):
    """A LoRA algorithm after one train() (two updates), with its base weights before it."""
    with built_algo(lora_config()) as algo:
        module = learner_module(algo)
        before = {key: value.clone() for key, value in module.causal_lm.state_dict().items()}
        algo.train()
        yield algo, before


def test_only_the_adapters_train_and_the_base_weights_stay_bit_identical(trained):
    algo, before = trained
    module = learner_module(algo)
    after = module.causal_lm.state_dict()
    assert set(after) == set(before)
    adapters = [key for key in after if is_adapter_key(key)]
    assert adapters and all(".lora_" in key for key in adapters)
    for key in after:
        if is_adapter_key(key):
            continue
        assert torch.equal(after[key], before[key]), key  # the base: bit-identical
    # lora_B starts at 0 and moved; the adapters are what changed.
    assert any(not torch.equal(after[key], before[key]) for key in adapters if ".lora_B." in key)


def test_the_optimizer_holds_the_adapter_parameters_only(trained):
    algo, _ = trained
    module = learner_module(algo)
    optimizer = algo.learner_group._learner._only_optimizer()
    adapter_ids = {id(param) for name, param in module.named_parameters() if is_adapter_key(name)}
    in_optimizer = {id(param) for group in optimizer.param_groups for param in group["params"]}
    assert in_optimizer == adapter_ids
    assert {id(param) for param in optimizer.state} == adapter_ids
    assert not any(param.requires_grad for name, param in module.named_parameters() if not is_adapter_key(name))


def test_the_module_state_is_the_adapters_and_the_generators_get_the_merged_weights(trained):
    algo, _ = trained
    module = learner_module(algo)
    weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]  # what checkpoints hold
    assert set(weights) == {key for key in module.state_dict() if is_adapter_key(key)}
    algo.sync_runner_weights()
    runner_module = algo.env_runner.module
    assert runner_module.peft_model is None  # the generator holds the plain model
    merged = merged_state_dict(module, prefix="causal_lm.")
    runner_state = runner_module.state_dict()
    assert set(runner_state) == set(merged)
    for key, value in runner_state.items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0)
    # The merged weights give the adapted model's log-probs.
    batch = unequal_minibatch(algo)
    with torch.no_grad():
        adapted = module.forward_inference(batch)["logprobs"]
        plain = runner_module.forward_inference(batch)["logprobs"]
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_restores_the_adapters(trained, tmp_path):
    algo, _ = trained
    weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
    path = algo.save_to_path(str(tmp_path / "checkpoint"))
    with built_algo(lora_config()) as restored:
        fresh = restored.learner_group.get_weights()[DEFAULT_MODULE_ID]
        assert any(not np.array_equal(fresh[key], weights[key]) for key in weights)
        restored.restore_from_path(path)
        again = restored.learner_group.get_weights()[DEFAULT_MODULE_ID]
        assert set(again) == set(weights)
        for key in weights:
            assert np.array_equal(again[key], weights[key]), key
        optimizer = restored.learner_group._learner._only_optimizer()
        assert {int(state["step"]) for state in optimizer.state.values()} == {2}


def test_the_merged_export_generates_exactly_what_the_adapter_model_does(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    algo, _ = trained
    folder = tmp_path / "model"
    algo.export_policy(folder)
    assert (folder / "adapter" / "adapter_config.json").is_file()
    base = copy.deepcopy(learner_module(algo).peft_model).unload()  # the starting weights, adapters removed
    adapter_model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = torch.tensor([[5, 17, 42, 9, 33, 61], [88, 12, 7, 7, 100, 3]])
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        from_adapter = adapter_model.generate(input_ids=prompts, **settings)
        from_merged = merged_model.generate(input_ids=prompts, **settings)
        logits_adapter = adapter_model(input_ids=prompts).logits
        logits_merged = merged_model(input_ids=prompts).logits
    assert torch.equal(from_adapter, from_merged)
    torch.testing.assert_close(logits_merged, logits_adapter, rtol=1e-5, atol=1e-5)
    # ... and that is the trained policy, not the base model.
    with torch.no_grad(), adapter_model.disable_adapter():
        assert not torch.equal(adapter_model(input_ids=prompts).logits, logits_adapter)


def test_lora_with_kl_uses_the_base_model_as_reference_without_a_second_copy(ray_session, monkeypatch):
    from transformers import PreTrainedModel

    copied = []
    original = copy.deepcopy

    def spy(value, *args, **kwargs):
        if isinstance(value, PreTrainedModel):
            copied.append(type(value).__name__)
        return original(value, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", spy)
    with built_algo(lora_config(kl_coef=0.5)) as algo:
        module = learner_module(algo)
        assert module.has_reference
        assert not isinstance(module.__dict__["reference_forward"], torch.nn.Module)
        parameters = sum(1 for _ in module.parameters())
        batch = unequal_minibatch(algo)
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
        assert float(logged["ref_kl"]) == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at 0
        algo._update(batch)
        logged = algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID]
        assert float(logged["ref_kl"]) > 1e-7
        # The reference is the base model: the adapters switched off.
        with torch.no_grad():
            with module.peft_model.disable_adapter():
                base = module.forward_inference(batch)["logprobs"]
            reference = module.reference_logprobs(batch)
            policy = module.forward_inference(batch)["logprobs"]
        assert torch.equal(reference, base)
        assert not torch.equal(policy, base)  # the adapters are back on afterwards
        assert sum(1 for _ in module.parameters()) == parameters
    assert copied == []  # no copy of the model was made


def test_two_ddp_learners_match_one_learner_with_lora_and_kl(ray_session):
    """LoRA and the KL term on replicated (DDP) learners: the same update as one learner's."""
    from tests.helpers import learner_weights, max_abs_diff

    settings = dict(kl_coef=0.5, lr=1e-3)
    with (
        built_algo(lora_config(**settings)) as local,
        built_algo(lora_config(**settings).learners(num_learners=2)) as ddp,
    ):
        initial = learner_weights(local)
        assert max_abs_diff(initial, learner_weights(ddp)) == 0.0
        batch = unequal_minibatch(local)
        for _ in range(2):  # the first update at the reference, the second away from it
            stats = []
            for algo in (local, ddp):
                algo._update({key: value.clone() for key, value in batch.items()})
                stats.append(algo.metrics.reduce()["learners"][DEFAULT_MODULE_ID])
            for key in ("policy_loss", "ref_kl", "ref_kl_loss", "approx_kl"):
                assert float(stats[1][key]) == pytest.approx(float(stats[0][key]), rel=1e-4, abs=1e-7), key
        assert float(stats[0]["ref_kl"]) > 1e-7
        assert max_abs_diff(initial, learner_weights(local)) > 1e-5
        assert max_abs_diff(learner_weights(local), learner_weights(ddp)) < 1e-5


def test_lora_trains_with_activation_checkpointing_and_micro_batches(ray_session):
    with built_algo(lora_config(gradient_checkpointing=True, micro_batch_tokens=40)) as algo:
        module = learner_module(algo)
        before = {key: value.clone() for key, value in module.causal_lm.state_dict().items()}
        algo._update(unequal_minibatch(algo))
        after = module.causal_lm.state_dict()
        assert all(torch.equal(after[key], before[key]) for key in after if not is_adapter_key(key))
        assert any(not torch.equal(after[key], before[key]) for key in after if ".lora_B." in key)
