"""Bad input never reaches a traceback (issue 25): generated values for every registered ``dapo/*``
environment's settings, and generated ``--set`` / ``--env-config`` assignments, give a working
environment (or job) or a one-line error naming the setting, never another exception type.

Hypothesis runs derandomized (the same examples every run, so CI is reproducible) and with a modest
example count: each example builds an environment, and the suite must stay quick on 2 cores.
"""

from __future__ import annotations

import inspect
import math
import re

import gymnasium as gym
import pytest
from gymnasium.envs.registration import load_env_creator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dapo_envs
from dapo_rl.cli import main
from dapo_rl.jobs import JOB_KEYS, JobError, build_config, load_job, make_env, parse_assignment, quoting_hint
from dapo_rl.settings import DAPO_SETTINGS, OPTIMIZER_DEFAULTS

# gymnasium.make warns about a render_mode outside the environment's list before the constructor refuses it.
pytestmark = pytest.mark.filterwarnings("ignore:.*render_mode.*:UserWarning")

ENV_IDS = sorted(env_id for env_id in gym.registry if env_id.startswith("dapo/"))

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: What YAML can hand a constructor: scalars of every type (huge, negative, NaN, infinite, empty) and
#: small lists and mappings of them.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
#: Values near the settings' own domains, so that examples also reach the checks past the type test
#: (and build working environments).
NEAR_DOMAIN = st.sampled_from(
    [
        0,
        1,
        2,
        3,
        6,
        7,
        -1,
        0.0,
        0.5,
        1.0,
        1.5,
        "+",
        "-",
        "*",
        "+-*",
        "/",
        "train",
        "test",
        "dapo",
        "boxed",
        "math_verify",
        "gsm8k",
        "nope",
        "{problem}?",
        "aime24",
        "math500",
        "ansi",
        "human",
        ["+"],
        ["+", "x"],
        [None],
        {"max_chars": 8},
        {"max_chars": -1},
        {"nope": 1},
        {"decimals": True},
    ]
)
VALUES = ANY_VALUE | NEAR_DOMAIN

#: --set / --env-config text: YAML's special forms (null, sequences, mappings, quoted, odd numbers)
#: and arbitrary text.
YAML_TEXT = st.sampled_from(
    [
        "-",
        "- x",
        "[1, 2]",
        "[]",
        "{}",
        "{a: 1}",
        "null",
        "~",
        "yes",
        "no",
        "true",
        "1e400",
        ".nan",
        "-.inf",
        "0x1F",
        "'-'",
        '"+-"',
        "'",
        '"',
        ":",
        "a: b",
        "[",
        "{",
        "&a",
        "*a",
        "!!python/object:os.system",
        "3",
        "-3",
        "0.5",
        "",
        " ",
        "+-",
        "train",
        "test",
        "dapo",
        "tiny-qwen2",
        "a\nb",
        ":\n",
    ]
) | st.text(max_size=16)


def _env_parameters(env_id: str) -> tuple[type, dict, list[str]]:
    spec = gym.spec(env_id)
    creator = load_env_creator(spec.entry_point)
    return creator, dict(spec.kwargs), sorted(inspect.signature(creator).parameters)


def _assert_one_line_naming(error: Exception, names: list[str]) -> None:
    message = str(error)
    assert message.strip() and "\n" not in message, f"{type(error).__name__}: {message!r}"
    assert any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) for name in names), (names, message)


def _exercise(env) -> None:
    """A working environment: it resets, and scores a correct answer (through its verifier)."""
    prompt, info = env.reset(seed=0)
    problem = env.problem(info["index"])
    assert prompt == problem.prompt
    env.step(env.solution_text(problem))


@pytest.mark.parametrize("env_id", ENV_IDS)
@FUZZ
@given(data=st.data())
def test_every_environment_setting_gives_a_working_env_or_a_one_line_error_naming_it(env_id, data):
    creator, kwargs, names = _env_parameters(env_id)
    chosen = data.draw(st.dictionaries(st.sampled_from(names), VALUES, min_size=1, max_size=3), label="settings")
    try:
        env = creator(**{**kwargs, **chosen})
    except (TypeError, ValueError) as error:
        _assert_one_line_naming(error, list(chosen))
        return
    try:
        _exercise(env)
    finally:
        env.close()


#: Values a constructor used to accept silently or fail on with another message or exception type.
REGRESSIONS = [
    ("dapo/Arithmetic-v0", {"operators": [None]}, "operators"),  # YAML's reading of operators=-
    ("dapo/Arithmetic-v0", {"operators": 5}, "operators"),
    ("dapo/Arithmetic-v0", {"split": [1]}, "split"),
    ("dapo/Arithmetic-v0", {"difficulty": [1]}, "difficulty"),
    ("dapo/Arithmetic-v0", {"difficulty": True}, "difficulty"),
    ("dapo/Arithmetic-v0", {"allow_negative": "no"}, "allow_negative"),
    ("dapo/Arithmetic-v0", {"num_problems": 10**30, "digits": 6}, "num_problems"),
    ("dapo/Arithmetic-v0", {"render_mode": 3}, "render_mode"),
    ("dapo/Arithmetic-v0", {"verifier": "nope"}, "verifier"),
    ("dapo/Arithmetic-v0", {"verifier_timeout": "1"}, "verifier_timeout"),
    ("dapo/MATH500-v0", {"verifier_timeout": 1e30}, "verifier_timeout"),
    ("dapo/Math-v0", {"max_response_chars": True}, "max_response_chars"),
    ("dapo/Math-v0", {"dataset": 5}, "dataset"),
    ("dapo/Math-v0", {"dataset": "nope"}, "dataset"),
    ("dapo/Math-v0", {"dataset": ":\n"}, "dataset"),  # a line break in the value stays out of the message
    ("dapo/Calculator-v0", {"call_reward": "abc"}, "call_reward"),
    ("dapo/Calculator-v0", {"call_reward": math.nan}, "call_reward"),
    ("dapo/Calculator-v0", {"limits": 5}, "limits"),
    ("dapo/Calculator-v0", {"limits": {"max_chars": "x"}}, "limits"),
    ("dapo/Calculator-v0", {"limits": {"nope": 1}}, "limits"),
]


@pytest.mark.parametrize(("env_id", "settings", "name"), REGRESSIONS)
def test_bad_settings_found_by_the_fuzzing_are_refused_naming_them(env_id, settings, name):
    creator, kwargs, _ = _env_parameters(env_id)
    with pytest.raises((TypeError, ValueError)) as raised:
        creator(**{**kwargs, **settings})
    _assert_one_line_naming(raised.value, [name])


def test_an_unknown_verifier_is_a_key_error_and_a_value_error_in_one_line():
    with pytest.raises(KeyError) as raised:
        dapo_envs.get_verifier("nope")
    assert isinstance(raised.value, ValueError)
    assert str(raised.value).startswith("no verifier named 'nope'; registered:")


@pytest.mark.parametrize("env_id", ENV_IDS)
@FUZZ
@given(data=st.data())
def test_env_config_from_the_command_line_gives_an_env_or_a_one_line_job_error(env_id, data):
    _, _, names = _env_parameters(env_id)
    keys = st.sampled_from([*names, "nope"])
    assignments = data.draw(
        st.lists(st.builds(lambda key, text: f"{key}={text}", keys, YAML_TEXT), min_size=1, max_size=3),
        label="assignments",
    )
    try:
        env_config = dict(parse_assignment(assignment, "--env-config") for assignment in assignments)
        env = make_env(env_id, env_config)
    except JobError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, message
        hint = quoting_hint(message, "--env-config", assignments)
        assert "\n" not in hint and (hint == "" or "values are read as YAML" in hint)
        return
    try:
        _exercise(env)
    finally:
        env.close()


TRAINING_KEYS = sorted(set(DAPO_SETTINGS) | set(OPTIMIZER_DEFAULTS))


@FUZZ
@given(
    assignments=st.lists(
        st.builds(
            lambda key, text: f"{key}={text}",
            st.sampled_from(
                [
                    *sorted(JOB_KEYS),
                    *TRAINING_KEYS,
                    "env_config.operators",
                    "env_config.digits",
                    "env_config.nope",
                    "nope",
                ]
            ),
            YAML_TEXT,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_set_assignments_give_a_job_or_a_one_line_job_error(assignments):
    """What ``dapo-rl train --set ...`` does before any work: parse, type-check, validate, make the env."""
    try:
        job = load_job(None, assignments)
        build_config(job)
        make_env(job["env"], dict(job["env_config"])).close()
    except JobError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, message
        assert "\n" not in quoting_hint(message, "--set", assignments)


def test_the_issues_example_says_what_is_wrong_and_how_to_quote_it(capsys):
    argv = ["eval", "--model", "tiny-qwen2", "--env", "dapo/Arithmetic-v0", "--env-config", "operators=-"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert 'operators must be a non-empty string over "+-*" (e.g. "+-"), got [None]' in err
    assert """e.g. --env-config operators="'-'\"""" in err


def test_the_same_value_in_train_set_gets_the_same_hint(capsys, tmp_path):
    output = tmp_path / "out"
    assert main(["train", "--set", "env_config.operators=-", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "operators must be" in err, err
    assert """--set env_config.operators="'-'\"""" in err
    assert not output.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--problems", "0"),
        ("--max-new-tokens", "0"),
        ("--max-prompt-length", "-1"),
        ("--tensor-parallel-size", "0"),
        ("--seed", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "0"),
        ("--top-p", "1.5"),
    ],
)
def test_eval_options_out_of_range_exit_2_in_one_line(option, value, capsys):
    argv = ["eval", "--model", "tiny-qwen2", "--env", "dapo/Arithmetic-v0", option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dapo-rl: error: {option} must be") and len(err.strip().splitlines()) == 1, err
