"""Jobs as settings: the main job, a job read from a YAML file and ``key=value`` assignments, and
the run settings beside its DAPOConfig.

- :data:`DEFAULT_JOB`: the main job (the embedded tiny model on ``dapo/Arithmetic-v0``, on the CPU);
- :func:`load_job`: the default job overridden by a YAML file, then by ``key=value`` assignments;
- :func:`build_config`: a job's validated :class:`~dapo_rl.rllib.dapo.DAPOConfig`;
- :class:`RunSettings`: what a run needs besides its config (length, warm-start, evaluation, trackers).

Bad input (an unknown key, a wrong type, a missing model, an unknown environment id, an invalid
setting) raises :class:`JobError`, one line naming the offending value.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml

from dapo_envs.base import printable
from dapo_rl.jobs import cluster
from dapo_rl.jobs.tracking import LOGGERS, missing_logger_package
from dapo_rl.jobs.warmstart import WarmStartSettings
from dapo_rl.models.loading import TINY_PRESET
from dapo_rl.rllib.dapo import DAPOConfig, InvalidConfigError
from dapo_rl.rllib.env_runner import unknown_env_config_keys
from dapo_rl.settings import SETTINGS

#: The main job. Keys: the job's own (below) and, under "training", any DAPOConfig training setting.
DEFAULT_JOB: dict[str, Any] = {
    "env": "dapo/Arithmetic-v0",
    "env_config": {"operators": "+"},
    "model": TINY_PRESET,
    "dtype": None,  # torch dtype name for a checkpoint's weights (None: as saved; the preset: float32)
    "lora": None,  # LoRA adapters instead of full fine-tuning: {r, alpha, target_modules, dropout} (docs/models.md)
    "seed": 0,
    "iterations": 150,
    "num_learners": 0,
    "num_gpus_per_learner": 0,  # > 0 with num_learners 0: the local learner trains on the GPU
    # CPUs (torch threads) of each learner; None: automatic (see fit: a local learner's trial takes
    # the cores the Ray cluster has to spare, not RLlib's 1, which would leave torch one thread)
    "num_cpus_per_learner": None,
    "num_env_runners": 0,
    "num_gpus_per_env_runner": 0,
    # Custom Ray resources each learner / env runner asks for ({learner_node: 1}): pins them to the
    # nodes started with them (ray start --resources). With num_learners 0, the trial's own process.
    "learner_resources": {},
    "env_runner_resources": {},
    "warmstart_steps": 1200,
    "warmstart_batch_size": 64,
    "warmstart_lr": 1e-3,
    "warmstart_noise": 0.5,
    "eval_env": None,  # environment id for held-out evaluation (None: the training env's held-out split)
    # true: evaluate on the training problems (an environment without held-out ones; dapo_rl.jobs.eval_problems)
    "eval_on_training_problems": False,
    "eval_problems": 200,
    "eval_samples": 4,
    "checkpoint_every": 10,  # iterations between checkpoints (0: only at the end); a resume loses fewer
    "keep_checkpoints": 2,  # newest checkpoints kept (>= 2: a crash while writing one leaves the one before)
    "loggers": [],  # experiment trackers besides Tune's TensorBoard files: "wandb", "mlflow" (offline)
    # Only the settings where this CPU job genuinely differs from the paper's 32B run (the defaults,
    # dapo_rl.settings): a 3-layer model on 2-digit addition, on 2 cores in minutes.
    "training": {
        "group_size": 8,  # 8 responses per prompt already mix right and wrong answers after the warm-start
        "prompts_per_step": 32,
        "minibatch_prompts": 8,
        "lr": 3e-4,  # a randomly initialised tiny model, not a pretrained 32B one
        "lr_warmup_steps": 0,
        "weight_decay": 0.0,
        "max_prompt_length": 64,  # "What is 12 + 7?" and the model's 512 positions
        "max_response_length": 16,  # "Answer: 198" and EOS take 12 tokens
        "overlong_cache_len": 4,
        "generation_batch_prompts": 48,  # 1.5x: most prompts are informative after the warm-start
        "on_sampling_limit": "train",  # a short CPU run trains on what it kept rather than stopping
    },
}


JOB_KEYS = set(DEFAULT_JOB) - {"training"}


class JobError(ValueError):
    """Bad input to a job (settings, files, models, environment ids): one line, no traceback needed."""


def load_job(config_file: str | None, assignments: Sequence[str]) -> dict[str, Any]:
    """The default job, overridden by a YAML file, then by ``key=value`` assignments.

    Keys are job keys (``iterations``, ``model``, ...), ``env_config.NAME``, or DAPOConfig training
    settings (``group_size``, ``lr``, ...) written flat or under ``training:``.
    """
    job = copy.deepcopy(DEFAULT_JOB)
    overrides = _file_overrides(config_file, job) if config_file else []
    return overridden(job, overrides + assignment_overrides(assignments))


def assignment_overrides(assignments: Sequence[str]) -> list[tuple[str, Any, str]]:
    return [(*parse_assignment(assignment, "--set"), f"--set {printable(assignment)}") for assignment in assignments]


def overridden(job: dict[str, Any], overrides: list[tuple[str, Any, str]]) -> dict[str, Any]:
    for key, value, origin in overrides:
        if key.startswith("env_config."):
            job["env_config"][key.split(".", 1)[1]] = value
        elif key in JOB_KEYS:
            job[key] = _checked(key, value, DEFAULT_JOB[key], origin)
        elif key in SETTINGS:
            setting = SETTINGS[key]
            value = setting.coerce(value)
            if (problem := setting.problem(value)) is not None:
                raise JobError(f"{origin}: {problem}")
            job["training"][key] = value
        else:
            known = sorted(JOB_KEYS | set(SETTINGS))
            raise JobError(f"unknown setting {key!r} ({origin}); known settings: {', '.join(known)}, env_config.NAME")
    return job


def _file_overrides(config_file: str, job: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, origin) of each setting in a YAML job file; its ``env_config`` replaces the default's."""
    try:
        loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise JobError(f"cannot read config file {config_file}: {error.strerror}") from None
    except yaml.YAMLError as error:  # one line: where, and what the parser expected
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise JobError(f"config file {config_file} is not valid YAML: {where}{what}") from None
    if not isinstance(loaded, dict):
        raise JobError(f"config file {config_file} must hold a mapping of settings, got {type(loaded).__name__}")
    overrides = []
    for key, value in loaded.items():
        if key in ("training", "env_config") and isinstance(value, dict):
            if key == "env_config":
                job["env_config"] = {}
            prefix = "" if key == "training" else "env_config."
            overrides += [(f"{prefix}{name}", inner, f"{config_file}: {key}.{name}") for name, inner in value.items()]
        else:
            overrides.append((key, value, f"{config_file}: {key}"))
    return overrides


def parse_assignment(assignment: str, option: str) -> tuple[str, Any]:
    """``key=value`` from the command line (``option`` names it in errors): the value read as YAML
    (``3``, ``1e-4``, ``true``, ``[a, b]``, ``"a quoted\\n string"``), else as the text. Text is kept
    exactly as given: YAML would strip a prompt template's trailing newline or spaces."""
    if "=" not in assignment:
        raise JobError(f"{option} takes key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key.strip(), raw
    quoted = raw.strip()[:1] in ("'", '"')
    return key.strip(), raw if isinstance(value, str) and not quoted else value


def _checked(key: str, value: Any, default: Any, origin: str) -> Any:
    """Check a job key's value against the type of its default (a default of None accepts anything).
    Training settings are checked by their declarations instead (dapo_rl.settings.SETTINGS)."""
    if default is None:
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
    elif expected is list and isinstance(value, str):  # --set loggers=wandb: a list of one
        value, ok = [value], True
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise JobError(f"setting {key!r} ({origin}) must be {expected.__name__}, got {value!r}")
    return value


def _model_config(job: dict[str, Any], model: str) -> dict[str, Any]:
    model_config: dict[str, Any] = {"model": model}
    if job.get("dtype"):
        model_config["dtype"] = job["dtype"]
    if job.get("lora") is not None:
        model_config["lora"] = job["lora"]
    return model_config


def build_config(job: dict[str, Any], model: str | None = None) -> DAPOConfig:
    """The validated DAPOConfig of a job, training ``model`` (default: the job's)."""
    check_env_id(job["env"])
    model = absolute_if_local(model or job["model"])
    try:
        config = (
            DAPOConfig()
            .environment(job["env"], env_config=dict(job["env_config"]))
            .rl_module(model_config=_model_config(job, model))
            .training(**job["training"])
            .learners(
                num_learners=job["num_learners"],
                num_gpus_per_learner=job["num_gpus_per_learner"],
                num_cpus_per_learner=_learner_cpus(job),
                **cluster.learner_placement(job),
            )
            .env_runners(
                num_env_runners=job["num_env_runners"],
                num_gpus_per_env_runner=job["num_gpus_per_env_runner"],
                **cluster.env_runner_placement(job),
            )
            .debugging(seed=job["seed"], log_level="ERROR")
        )
    except (TypeError, ValueError) as error:  # RLlib's setters check some values (grad_clip_by) as they are set
        raise JobError(f"invalid settings: {_one_line(str(error))}") from None
    if not job["num_learners"] and job["learner_resources"]:  # the learner lives in the trial's own process
        config.resources(custom_resources_for_main_process=dict(job["learner_resources"]))
    return validated(config)


def _one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces (a library's multi-line message)."""
    return " ".join(text.split())


def _learner_cpus(job: dict[str, Any]) -> int | str:
    """The ``num_cpus_per_learner`` of a job: the given number, or "auto" (resolved by :func:`fit`)."""
    cpus = job["num_cpus_per_learner"]
    if cpus is None:
        return "auto"
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise JobError(f"num_cpus_per_learner must be an integer >= 1 or null (automatic), got {cpus!r}")
    return cpus


def validated(config: DAPOConfig) -> DAPOConfig:
    """``config`` once ``validate()`` passes; else a JobError with every problem on one line."""
    try:
        config.validate()
    except InvalidConfigError as error:
        raise JobError("invalid settings: " + "; ".join(map(_one_line, error.problems))) from None
    except ValueError as error:  # RLlib's own checks, and a model that cannot be found
        raise JobError(_one_line(str(error))) from None
    return config


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run needs besides its DAPOConfig: length, warm-start, evaluation, trackers.

    No defaults here: :data:`DEFAULT_JOB` holds them (``RunSettings.from_job(DEFAULT_JOB)``). Checked
    when made: bad values (an unknown evaluation env, a missing logger package, ...) raise JobError
    before any work.
    """

    iterations: int
    warmstart_steps: int  # 0: no warm-start (a pretrained model)
    warmstart_batch_size: int
    warmstart_lr: float
    warmstart_noise: float
    eval_env: str | None  # None: the training environment's held-out split
    eval_on_training_problems: bool  # evaluate on the training problems, saying so (dapo_rl.jobs.eval_problems)
    eval_problems: int
    eval_samples: int
    checkpoint_every: int  # 0: at the end only
    keep_checkpoints: int
    loggers: tuple[str, ...]  # "wandb", "mlflow"

    @classmethod
    def from_job(cls, job: dict[str, Any], **changes: Any) -> RunSettings:
        """The run settings of a job (its keys of the same names), with ``changes`` applied."""
        values = {field.name: job[field.name] for field in dataclasses.fields(cls)}
        values["loggers"] = tuple(values["loggers"])
        return dataclasses.replace(cls(**values), **changes)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Fail on bad run settings before any work: an unknown evaluation env, a missing logger package."""
        if self.eval_env is not None:
            check_env_id(self.eval_env, "evaluation environment")
        unknown = sorted(set(self.loggers) - set(LOGGERS))
        if unknown:
            raise JobError(f"unknown logger(s) {unknown}; loggers: {', '.join(LOGGERS)}")
        for name in self.loggers:
            missing = missing_logger_package(name)
            if missing:
                raise JobError(missing)
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise JobError(
                f"checkpoint_every must be an integer >= 0 (0: only at the end), got {self.checkpoint_every!r}"
            )
        if not (isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1):
            raise JobError(f"keep_checkpoints must be an integer >= 1, got {self.keep_checkpoints!r}")
        try:
            self.warmstart_settings(seed=0)
        except ValueError as error:
            raise JobError(str(error)) from None

    def warmstart_settings(self, *, seed: int) -> WarmStartSettings:
        """The supervised warm-start's settings (``WarmStartSettings`` checks them)."""
        return WarmStartSettings(
            steps=self.warmstart_steps,
            batch_size=self.warmstart_batch_size,
            lr=self.warmstart_lr,
            noise=self.warmstart_noise,
            seed=seed,
        )


def check_env_id(env_id: str, role: str = "environment") -> None:
    if env_id not in gym.registry:
        registered = sorted(i for i in gym.registry if i.startswith("dapo/"))
        raise JobError(f"unknown {role} id {env_id!r}; registered dapo/ ids: {registered}")


def absolute_if_local(model: str) -> str:
    # Tune runs the trial in its own working directory: a relative model folder must be made absolute.
    return os.path.abspath(model) if model != TINY_PRESET and os.path.exists(model) else model


def make_env(env_id: str, env_config: dict[str, Any]) -> Any:
    """``gymnasium.make(env_id, **env_config).unwrapped``; a bad setting raises a one-line JobError.

    The environment's constructor checks its arguments (naming the bad one); this adds which
    environment and settings, and drops what Gymnasium appends to a constructor's TypeError (its
    kwargs again, and "was raised from the environment creator").
    """
    check_env_id(env_id)
    _check_env_config_keys(env_id, env_config)
    render_mode = env_config.get("render_mode")
    if render_mode is not None and not isinstance(render_mode, str):  # gymnasium.make itself would fail on it
        raise JobError(f"cannot make environment {env_id!r}: render_mode must be a string or null, got {render_mode!r}")
    try:
        return gym.make(env_id, **env_config).unwrapped
    except (TypeError, ValueError) as error:
        reason = str(error).split(" was raised from the environment creator")[0]
        raise JobError(f"cannot make environment {env_id!r} with env_config {env_config}: {reason}") from None


def quoting_hint(message: str, option: str, assignments: Sequence[str]) -> str:
    """How to quote a command-line value that YAML read as something other than text, when ``message``
    (an error) names its setting; else "". E.g. ``--env-config operators=-`` is ``[None]`` in YAML
    (a list holding null): the hint says to write ``--env-config operators="'-'"``."""
    for assignment in assignments:
        try:
            key, value = parse_assignment(assignment, option)
        except JobError:
            continue
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, str) or not name or not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message):
            continue
        raw = printable(assignment.split("=", 1)[1])
        quoted = "'" + raw.replace("'", "''") + "'"  # YAML's single-quoted scalar: '' is one quote
        return (
            f"; {option} values are read as YAML ({key}={raw} gave {value!r}): to pass text, quote it, "
            f'e.g. {option} {key}="{quoted}"'
        )
    return ""


def _check_env_config_keys(env_id: str, env_config: dict[str, Any]) -> None:
    """An env_config key the environment does not take fails here, named with the ones it takes."""
    if (problem := unknown_env_config_keys(env_id, env_config)) is not None:
        raise JobError(problem)
