"""The ``dapo-rl`` command: ``train`` (a Tune run of DAPO) and ``eval`` (avg@k of a model folder).

Parses arguments, calls :mod:`dapo_rl.jobs` (where jobs, settings and the train -> export ->
evaluate pipeline live) and prints. ``dapo-rl train`` with no arguments is the main job:
``dapo_rl.jobs.DEFAULT_JOB``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import gymnasium as gym

from dapo_envs import held_out_env_config
from dapo_rl import __version__
from dapo_rl.jobs import (
    JobError,
    RunStoppedError,
    evaluate_policy,
    load_job,
    parse_assignment,
    quoting_hint,
    resume_job,
    train,
)
from dapo_rl.jobs.cluster import ClusterError
from dapo_rl.jobs.evaluation import evaluate_model
from dapo_rl.jobs.tracking import LOGGERS


def run_train(args: argparse.Namespace) -> None:
    if args.resume:
        if args.config or args.output:
            raise JobError("--resume DIR continues the run in DIR with the job it started with: drop --config/--output")
        job, output = resume_job(args.resume, args.set), Path(args.resume)
    else:
        job = load_job(args.config, args.set)
        output = Path(args.output or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    job["loggers"] = list(dict.fromkeys([*job["loggers"], *args.logger]))  # job file's first, no repeats
    summary = train(job, output, resume=bool(args.resume), address=args.address)
    held_out = summary.get("evaluated_on", {}).get("split", "held-out") == "held-out"
    print(
        f"done in {summary['wall_seconds']:.0f}s: {'held-out accuracy' if held_out else 'accuracy on training problems'} "
        f"{summary['eval_accuracy_before']:.3f} -> "
        f"{summary['eval_accuracy_after']:.3f}; model at {summary['model']}; summary at {output / 'summary.json'}"
    )


#: ``dapo-rl eval`` options (argparse names) -> evaluate_model keyword arguments.
EVAL_OPTIONS = {
    "samples": "samples",
    "problems": "num_problems",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "backend": "backend",
    "tensor_parallel_size": "tensor_parallel_size",
    "max_prompt_length": "max_prompt_length",
    "chat_template": "apply_chat_template",
}

#: ``--chat-template`` values -> evaluate_model's ``apply_chat_template``.
CHAT_TEMPLATE_CHOICES = {"auto": None, "on": True, "off": False}


def run_eval(args: argparse.Namespace) -> None:
    given_env_config = dict(parse_assignment(assignment, "--env-config") for assignment in args.env_config)
    # The environment's held-out problems unless --env-config says otherwise (e.g. split=train).
    env_config = (
        {**held_out_env_config(args.env, given_env_config), **given_env_config}
        if args.env in gym.registry
        else given_env_config
    )
    for option in ("samples", "problems", "max_new_tokens", "max_prompt_length", "tensor_parallel_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise JobError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.seed is not None and args.seed < 0:  # numpy's generators take no negative seed
        raise JobError(f"--seed must be >= 0, got {args.seed}")
    if args.temperature is not None and not args.temperature > 0:  # "not >": NaN fails too
        raise JobError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise JobError(f"--top-p must be in (0, 1], got {args.top_p}")
    # Options left out keep dapo_rl.jobs.evaluation.evaluate_model's defaults (their one home).
    given = {name: getattr(args, option) for option, name in EVAL_OPTIONS.items() if getattr(args, option) is not None}
    if "apply_chat_template" in given:
        given["apply_chat_template"] = CHAT_TEMPLATE_CHOICES[given["apply_chat_template"]]
    result = evaluate_policy(args.model, args.env, env_config=env_config, **given)
    print(json.dumps(result.as_dict(), indent=2))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="dapo-rl", description="DAPO on Ray RLlib: train and evaluate reasoning policies."
    )
    root.add_argument("--version", action="version", version=f"dapo-rl {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train with DAPO (no arguments: the embedded CPU default)")
    train_parser.add_argument("--config", help="YAML file of settings (job keys and DAPOConfig training settings)")
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    train_parser.add_argument("--output", help="output folder (default: runs/train-<time>)")
    train_parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in output folder DIR from its newest "
        "complete checkpoint (--set may change iterations, checkpoint_every, keep_checkpoints, and the "
        "placement: learner_resources, env_runner_resources)",
    )
    train_parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="run on the Ray cluster at this address (what `ray start --head` printed; default: "
        "RAY_ADDRESS when set, else a new local Ray instance); checked before any work",
    )
    train_parser.add_argument(
        "--logger",
        action="append",
        default=[],
        choices=sorted(LOGGERS),
        help="also log to an experiment tracker, offline under the output folder (repeatable)",
    )
    eval_parser = commands.add_parser("eval", help="avg@k / pass@k / cons@k of a Hugging Face model folder")
    eval_parser.add_argument(
        "--model", required=True, help="a local model folder, a DAPO training checkpoint, or tiny-qwen2"
    )
    eval_parser.add_argument("--env", required=True, help="a registered environment id, e.g. dapo/AIME24-v0")
    default = {name: parameter.default for name, parameter in inspect.signature(evaluate_model).parameters.items()}
    eval_parser.add_argument("--samples", type=int, help=f"samples per problem (k; default {default['samples']})")
    eval_parser.add_argument("--problems", type=int, help="evaluate the first N problems only (default: all)")
    eval_parser.add_argument("--max-new-tokens", type=int, help=f"default {default['max_new_tokens']}")
    eval_parser.add_argument("--temperature", type=float, help=f"default {default['temperature']}")
    eval_parser.add_argument("--top-p", type=float, help=f"default {default['top_p']}")
    eval_parser.add_argument("--seed", type=int, help=f"default {default['seed']}")
    eval_parser.add_argument(
        "--env-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment settings; the environment's held-out split is used unless overridden",
    )
    eval_parser.add_argument("--max-prompt-length", type=int, help=f"default {default['max_prompt_length']}")
    eval_parser.add_argument(
        "--chat-template",
        choices=sorted(CHAT_TEMPLATE_CHOICES),
        help="auto (default): the tokenizer's chat template when it has one; on; off (plain text, "
        "as a job with apply_chat_template: false trains)",
    )
    eval_parser.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        help=f"default {default['backend']}; hf: transformers "
        "generate (on the GPU when there is one); vllm: a vLLM engine",
    )
    eval_parser.add_argument(
        "--tensor-parallel-size", type=int, help=f"GPUs of the vLLM engine (default {default['tensor_parallel_size']})"
    )
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            run_train(args)
        else:
            run_eval(args)
    except (JobError, ClusterError) as error:
        # A value from --set / --env-config that YAML read as something else than text (operators=- is
        # [None]) and that the error names: say how to quote it.
        option, assignments = ("--set", args.set) if args.command == "train" else ("--env-config", args.env_config)
        print(f"dapo-rl: error: {error}{quoting_hint(str(error), option, assignments)}", file=sys.stderr)
        return 2
    except RunStoppedError as error:
        print(f"dapo-rl: training stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
