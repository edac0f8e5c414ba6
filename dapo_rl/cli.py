"""The ``dapo-rl`` command: ``train`` (a Tune run of DAPO) and ``eval`` (avg@k of a model folder).

``dapo-rl train`` with no arguments is the main job: the embedded tiny Qwen2-architecture model,
warm-started briefly on noisy demonstrations, then trained with DAPO on ``dapo/Arithmetic-v0`` on
the CPU; held-out accuracy (avg@k at temperature 1 on the test split) is measured just before the
first DAPO update and after the last.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import ray
import yaml
from ray import tune
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import DEFAULT_MODULE_ID
from tqdm import tqdm

import dapo_envs  # noqa: F401  (registers the dapo/ environment ids)
from dapo_rl.dapo import DAPO_SETTINGS, DAPOConfig, sharded_state_folder
from dapo_rl.distributed import load_sharded_weights_unsharded
from dapo_rl.evaluation import evaluate_model, evaluate_runner
from dapo_rl.models import TINY_PRESET, ModelNotFoundError, load_policy, save_policy
from dapo_rl.module import TEXT_SPACE
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend, generation_device
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.warmstart import WarmStartSettings, supervised_warmstart

#: The main job. Keys: the job's own (below) and any DAPOConfig training setting under "training".
DEFAULT_JOB: dict[str, Any] = {
    "env": "dapo/Arithmetic-v0",
    "env_config": {"operators": "+"},
    "model": "tiny-qwen2",
    "dtype": None,  # torch dtype name for a checkpoint's weights (None: as saved; the preset: float32)
    "seed": 0,
    "iterations": 150,
    "num_learners": 0,
    "num_gpus_per_learner": 0,  # > 0 with num_learners 0: the local learner trains on the GPU
    "num_env_runners": 0,
    "num_gpus_per_env_runner": 0,
    "warmstart_steps": 1200,
    "warmstart_batch_size": 64,
    "warmstart_lr": 1e-3,
    "warmstart_noise": 0.5,
    "eval_env": None,  # environment id for held-out evaluation (None: the training env's test split)
    "eval_problems": 200,
    "eval_samples": 4,
    "training": {
        "group_size": 8,
        "prompts_per_step": 32,
        "minibatch_prompts": 8,
        "lr": 3e-4,
        "lr_warmup_steps": 0,
        "weight_decay": 0.0,
        "max_prompt_length": 64,
        "max_response_length": 16,
        "overlong_cache_len": 4,
        "dynamic_sampling": True,
        "generation_batch_prompts": 48,
        "max_sampling_rounds": 10,
        "on_sampling_limit": "train",
    },
}

JOB_KEYS = set(DEFAULT_JOB) - {"training"}


class UserError(Exception):
    """Bad input from the command line or config file: reported as one line, no traceback."""


# -- configuration ---------------------------------------------------------------------------------


def load_job(config_file: str | None, assignments: list[str]) -> dict[str, Any]:
    """The default job, overridden by a YAML file, then by ``key=value`` assignments.

    Keys are job keys (``iterations``, ``model``, ...), ``env_config.NAME``, or DAPOConfig training
    settings (``group_size``, ``lr``, ...) written flat or under ``training:``.
    """
    training_keys = set(DAPO_SETTINGS) | {"lr", "grad_clip", "num_epochs"}
    job = copy.deepcopy(DEFAULT_JOB)
    overrides: list[tuple[str, Any, str]] = []
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise UserError(f"cannot read config file {config_file}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise UserError(f"config file {config_file} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {config_file} must hold a mapping of settings, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key == "training" and isinstance(value, dict):
                overrides += [(name, inner, f"{config_file}: training.{name}") for name, inner in value.items()]
            elif key == "env_config" and isinstance(value, dict):
                job["env_config"] = {}
                overrides += [(f"env_config.{name}", inner, f"{config_file}: env_config.{name}") for name, inner in value.items()]
            else:
                overrides.append((key, value, f"{config_file}: {key}"))
    for assignment in assignments:
        if "=" not in assignment:
            raise UserError(f"--set takes key=value, got {assignment!r}")
        key, raw = assignment.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        overrides.append((key.strip(), value, f"--set {assignment}"))
    for key, value, origin in overrides:
        if key.startswith("env_config."):
            job["env_config"][key.split(".", 1)[1]] = value
        elif key in JOB_KEYS:
            job[key] = _checked(key, value, DEFAULT_JOB[key], origin)
        elif key in training_keys:
            default = job["training"].get(key, DAPO_SETTINGS.get(key))
            job["training"][key] = _checked(key, value, default, origin)
        else:
            known = sorted(JOB_KEYS | training_keys)
            raise UserError(f"unknown setting {key!r} ({origin}); known settings: {', '.join(known)}, env_config.NAME")
    return job


def _checked(key: str, value: Any, default: Any, origin: str) -> Any:
    """Check a value against the type of its default (None defaults accept anything)."""
    if default is None or value is None and key in ("dual_clip", "apply_chat_template"):
        return value
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise UserError(f"setting {key!r} ({origin}) must be {expected.__name__}, got {value!r}")
    return value


def build_config(job: dict[str, Any], model: str) -> Any:
    """The DAPOConfig of a job (validated)."""
    config = (
        DAPOConfig()
        .environment(job["env"], env_config=dict(job["env_config"]))
        .rl_module(model_config={"model": model, **({"dtype": job["dtype"]} if job.get("dtype") else {})})
        .training(**job["training"])
        .learners(num_learners=job["num_learners"], num_gpus_per_learner=job["num_gpus_per_learner"])
        .env_runners(num_env_runners=job["num_env_runners"], num_gpus_per_env_runner=job["num_gpus_per_env_runner"])
        .debugging(seed=job["seed"], log_level="ERROR")
    )
    try:
        config.validate()
    except ValueError as error:
        raise UserError(str(error).split("\nTo suppress")[0]) from None
    return config


# -- train -----------------------------------------------------------------------------------------


def train(job: dict[str, Any], output: Path) -> dict[str, Any]:
    start = time.perf_counter()
    # Tune runs the trial with its own working directory: every path it gets must be absolute.
    output = output.resolve()
    if job["model"] != TINY_PRESET and os.path.exists(job["model"]):
        job = {**job, "model": os.path.abspath(job["model"])}
    if job["env"] not in gym.registry:
        raise UserError(f"unknown environment id {job['env']!r}; registered dapo/ ids: {sorted(i for i in gym.registry if i.startswith('dapo/'))}")
    build_config(job, job["model"])  # fail on bad settings before any work
    output.mkdir(parents=True, exist_ok=True)
    training = job["training"]
    try:
        model, tokenizer = load_policy(job["model"], seed=job["seed"], dtype=job["dtype"])
    except ModelNotFoundError as error:
        raise UserError(str(error)) from None
    except ValueError as error:  # a bad dtype name
        raise UserError(str(error)) from None
    if job["eval_env"] is not None and job["eval_env"] not in gym.registry:
        raise UserError(f"unknown evaluation environment id {job['eval_env']!r}")
    try:
        train_env = gym.make(job["env"], **job["env_config"]).unwrapped
        if job["eval_env"] is None:
            test_env = gym.make(job["env"], **{**job["env_config"], **_test_split(job["env"])}).unwrapped
        else:
            test_env = gym.make(job["eval_env"]).unwrapped
    except (TypeError, ValueError) as error:
        raise UserError(f"cannot make environment {job['env']!r} with env_config {job['env_config']}: {error}") from None
    prompt_settings = PromptSettings(training.get("max_prompt_length", 2048), training.get("apply_chat_template"))

    def evaluate_current() -> float:
        # On the GPU when there is one, and back to the CPU after: training needs that memory.
        model.to(generation_device())
        try:
            backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
            runner = GenerationRunner(test_env, tokenizer, backend, prompt_settings)
            count = min(job["eval_problems"], test_env.num_problems)
            sampling = SamplingSettings(
                n=job["eval_samples"], max_new_tokens=training["max_response_length"],
                temperature=training.get("temperature", 1.0), top_p=training.get("top_p", 1.0),
                top_k=training.get("top_k", -1),
            )
            problems = [test_env.problem(i) for i in range(count)]
            return evaluate_runner(runner, problems, sampling, seed=job["seed"]).avg_at_k
        finally:
            model.to("cpu")

    policy_for_rl = job["model"]
    warmstart_seconds = 0.0
    if job["warmstart_steps"] > 0:
        warm_start = time.perf_counter()
        encoder = GenerationRunner(train_env, tokenizer, None, prompt_settings)
        settings = WarmStartSettings(
            steps=job["warmstart_steps"], batch_size=job["warmstart_batch_size"], lr=job["warmstart_lr"],
            noise=job["warmstart_noise"], seed=job["seed"],
        )
        with tqdm(total=settings.steps, desc="warm-start", unit="step", file=sys.stderr) as bar:
            supervised_warmstart(
                model, tokenizer, train_env, encoder.encode_prompt, settings,
                on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
            )
        policy_for_rl = str(output / "warmstart")
        save_policy(model, tokenizer, policy_for_rl)
        warmstart_seconds = time.perf_counter() - warm_start
    accuracy_before = evaluate_current()
    print(f"held-out accuracy before DAPO: {accuracy_before:.3f}", flush=True)

    config = build_config(job, policy_for_rl)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    progress = ProgressCallback(job["iterations"])
    rl_start = time.perf_counter()
    results = tune.Tuner(
        "DAPO",
        param_space=config,
        run_config=tune.RunConfig(
            name="dapo",
            storage_path=str((output / "tune").resolve()),
            stop={"training_iteration": job["iterations"]},
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True, num_to_keep=1),
            callbacks=[progress],
            verbose=0,
        ),
    ).fit()
    progress.close()
    result = results[0]
    if result.error is not None:
        raise RuntimeError(f"the Tune trial failed: {result.error}") from result.error
    rl_seconds = time.perf_counter() - rl_start
    export_checkpoint(result.checkpoint.path, output / "model")
    model, tokenizer = load_policy(output / "model")
    accuracy_after = evaluate_current()
    print(f"held-out accuracy after DAPO:  {accuracy_after:.3f}", flush=True)
    summary = {
        "eval_accuracy_before": accuracy_before,
        "eval_accuracy_after": accuracy_after,
        "eval_metric": f"avg@{job['eval_samples']} on the first {min(job['eval_problems'], test_env.num_problems)} "
        f"problems of {job['eval_env'] or job['env'] + ' (test split)'}, temperature {training.get('temperature', 1.0)}",
        "iterations": int(result.metrics["training_iteration"]),
        "wall_seconds": time.perf_counter() - start,
        "warmstart_seconds": warmstart_seconds,
        "rl_seconds": rl_seconds,
        "final_metrics": _plain(result.metrics),
        "checkpoint": result.checkpoint.path,
        "model": str(output / "model"),
        "job": job,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def export_checkpoint(checkpoint: str | os.PathLike[str], folder: str | os.PathLike[str]) -> None:
    """Write the policy of an RLlib DAPO checkpoint as a Hugging Face model folder.

    A checkpoint of sharded learners is consolidated in this process from its shards (no cluster
    needed); any other is restored as an Algorithm, which exports its learners' weights.
    """
    sharded = sharded_state_folder(checkpoint)
    if sharded is not None:
        with open(Path(checkpoint, "class_and_ctor_args.pkl"), "rb") as file:
            config_state = pickle.load(file)["ctor_args_and_kwargs"][0][0]
        config = DAPOConfig.from_state(config_state)
        module = config.get_rl_module_spec(spaces={DEFAULT_MODULE_ID: (TEXT_SPACE, TEXT_SPACE)}).build()
        load_sharded_weights_unsharded(module, sharded)
        save_policy(module.causal_lm, module.tokenizer, folder)
        return
    algo = Algorithm.from_checkpoint(os.fspath(checkpoint))
    try:
        algo.export_policy(folder)
    finally:
        algo.stop()


def is_rllib_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, "rllib_checkpoint.json"))


def _test_split(env_id: str) -> dict[str, Any]:
    """Keyword arguments selecting an environment's held-out split, where it has one."""
    entry = str(gym.registry[env_id].entry_point)
    return {"split": "test"} if entry.endswith(":ArithmeticEnv") else {}


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("dapo", "learners", "timers", "training_iteration", "time_total_s")
    return json.loads(json.dumps({k: metrics[k] for k in keep if k in metrics}, default=float))


class ProgressCallback(tune.Callback):
    """A progress bar over iterations and a one-line summary per iteration."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a live bar (and its stream) cannot be.
        return {"iterations": self.iterations, "bar": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.iterations, desc="DAPO", unit="iter", file=sys.stderr)
        dapo = result.get("dapo", {})
        learner = result.get("learners", {}).get("default_policy", {})
        nan = float("nan")
        self.bar.update(1)
        self.bar.write(
            f"iter {result['training_iteration']:4d}  acc {dapo.get('generated_accuracy', nan):.3f}  "
            f"reward {dapo.get('reward_mean', nan):+.3f}  len {dapo.get('response_length_mean', nan):.1f}  "
            f"rounds {dapo.get('sampling_rounds', 0):.0f}  kept {dapo.get('kept_group_ratio', nan):.2f}  "
            f"loss {learner.get('policy_loss', nan):+.4f}  entropy {learner.get('entropy', nan):.3f}  "
            f"clip_hi {learner.get('clip_frac_high', nan):.3f}  {dapo.get('step_seconds', nan):.1f}s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- eval ------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.env not in gym.registry:
        raise UserError(f"unknown environment id {args.env!r}")
    env_config = {}
    for assignment in args.env_config:
        if "=" not in assignment:
            raise UserError(f"--env-config takes key=value, got {assignment!r}")
        key, raw = assignment.split("=", 1)
        env_config[key] = yaml.safe_load(raw)
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    model = args.model
    if is_rllib_checkpoint(model):
        # A training checkpoint: export its policy to a temporary Hugging Face folder first.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        model = tempfile.mkdtemp(prefix="dapo-eval-")
        export_checkpoint(args.model, model)
    try:
        result = evaluate_model(
            model, args.env, env_config=env_config, samples=args.samples, num_problems=args.problems,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            backend=args.backend, tensor_parallel_size=args.tensor_parallel_size,
        )
    except (ModelNotFoundError, ImportError) as error:  # ImportError: --backend vllm without vLLM
        raise UserError(str(error)) from None
    return result.as_dict()


# -- entry point -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="dapo-rl", description="DAPO on Ray RLlib: train and evaluate reasoning policies.")
    commands = root.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train with DAPO (no arguments: the embedded CPU default)")
    train_parser.add_argument("--config", help="YAML file of settings (job keys and DAPOConfig training settings)")
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    train_parser.add_argument("--output", help="output folder (default: runs/train-<time>)")
    eval_parser = commands.add_parser("eval", help="avg@k / pass@k / cons@k of a Hugging Face model folder")
    eval_parser.add_argument("--model", required=True, help="a local model folder, a DAPO training checkpoint, or tiny-qwen2")
    eval_parser.add_argument("--env", required=True, help="a registered environment id, e.g. dapo/AIME24-v0")
    eval_parser.add_argument("--samples", type=int, default=4, help="samples per problem (k)")
    eval_parser.add_argument("--problems", type=int, default=None, help="evaluate the first N problems only")
    eval_parser.add_argument("--max-new-tokens", type=int, default=1024)
    eval_parser.add_argument("--temperature", type=float, default=1.0)
    eval_parser.add_argument("--top-p", type=float, default=1.0)
    eval_parser.add_argument("--seed", type=int, default=0)
    eval_parser.add_argument("--env-config", action="append", default=[], metavar="KEY=VALUE")
    eval_parser.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                             help="hf: transformers generate (on the GPU when there is one); vllm: a vLLM engine")
    eval_parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs of the vLLM engine")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            job = load_job(args.config, args.set)
            output = Path(args.output or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
            summary = train(job, output)
            print(
                f"done in {summary['wall_seconds']:.0f}s: held-out accuracy {summary['eval_accuracy_before']:.3f} -> "
                f"{summary['eval_accuracy_after']:.3f}; model at {summary['model']}; summary at {output / 'summary.json'}"
            )
        else:
            print(json.dumps(evaluate(args), indent=2))
    except UserError as error:
        print(f"dapo-rl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
