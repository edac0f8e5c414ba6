"""The registered environments: Gymnasium's checker, seeding, the trainer protocol, arithmetic splits,
held-out configurations."""

import re
import uuid
import warnings
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dapo_envs
from dapo_envs import Problem, VerifierResult, held_out_env_config, held_out_overrides, register_reasoning_env
from dapo_envs.arithmetic import DIFFICULTY_PRESETS, ArithmeticEnv

ALL_IDS = sorted(env_id for env_id in gym.registry if env_id.startswith("dapo/"))


def test_every_documented_id_is_registered():
    assert sorted(dapo_envs.ENV_IDS) == ALL_IDS
    assert {
        "dapo/Math-v0",
        "dapo/DAPOMath17k-v0",
        "dapo/AIME24-v0",
        "dapo/AIME25-v0",
        "dapo/MATH500-v0",
        "dapo/GSM8K-v0",
        "dapo/Arithmetic-v0",
    } <= set(ALL_IDS)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_check_env(env_id):
    env = gym.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning is a failure too
        check_env(env.unwrapped)
    env.close()


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_deterministic_under_a_seed(env_id):
    env_a, env_b = gym.make(env_id), gym.make(env_id)
    for seed in (0, 7):
        obs_a, info_a = env_a.reset(seed=seed)
        obs_b, info_b = env_b.reset(seed=seed)
        assert (obs_a, info_a) == (obs_b, info_b)
        assert [env_a.reset()[0] for _ in range(3)] == [env_b.reset()[0] for _ in range(3)]
    assert env_a.unwrapped.sample_problems(5, 123) == env_b.unwrapped.sample_problems(5, 123)
    prompts = {env_a.reset(seed=seed)[0] for seed in range(6)}
    assert len(prompts) > 1  # the seed does choose the problem
    env_a.reset(seed=1)
    env_b.reset(seed=1)
    assert env_a.step("Answer: 0") == env_b.step("Answer: 0")


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_solution_text_is_scored_correct_and_step_info(env_id):
    env = gym.make(env_id)
    base = env.unwrapped
    prompt, info = env.reset(seed=3)
    assert set(info) == {"problem_id", "data_source", "index"}
    problem = base.problem(info["index"])
    assert problem.prompt == prompt and problem.problem_id == info["problem_id"]
    assert prompt in base.observation_space
    obs, reward, terminated, truncated, step_info = env.step(base.solution_text(problem))
    assert (obs, reward, terminated, truncated) == (prompt, 1.0, True, False)
    assert step_info["acc"] is True and step_info["ground_truth"] == problem.answer and step_info["reason"] == ""
    assert {"acc", "score", "pred", "ground_truth", "reason", "problem_id", "data_source", "index"} <= set(step_info)
    env.reset(seed=3)
    steps, terminated = 0, False
    while not terminated:  # a multi-turn environment lets the model try again (dapo/MathRetry-v0)
        _, reward, terminated, truncated, step_info = env.step("I don't know.")
        steps, final = steps + 1, terminated or truncated
        assert not truncated and (final or steps < getattr(base, "max_turns", 1))
    assert (reward, step_info["acc"]) == (-1.0, False)
    assert step_info.get("turn", 1) == steps


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_trainer_protocol(env_id):
    base = gym.make(env_id).unwrapped
    problems = base.sample_problems(8, np.random.default_rng(0))
    assert len({p.index for p in problems}) == 8 and all(isinstance(p, Problem) for p in problems)
    for p in problems:
        assert p.messages == [{"role": "user", "content": p.prompt}]
        assert p.prompt in base.observation_space
        assert base.problem(p.index) == p
    responses = [base.solution_text(p) if i % 2 == 0 else "no answer" for i, p in enumerate(problems)]
    results = base.score(responses, [p.answer for p in problems])
    assert all(isinstance(r, VerifierResult) for r in results)
    assert [r.acc for r in results] == [i % 2 == 0 for i in range(8)]
    assert [r.score for r in results] == [1.0 if i % 2 == 0 else -1.0 for i in range(8)]
    with pytest.raises(IndexError):
        base.problem(base.num_problems)


def test_every_bundled_prompt_is_in_the_observation_space():
    for env_id in ("dapo/AIME24-v0", "dapo/AIME25-v0", "dapo/MATH500-v0", "dapo/GSM8K-v0"):
        base = gym.make(env_id).unwrapped
        assert all(base.problem(i).prompt in base.observation_space for i in range(base.num_problems))
    base = gym.make("dapo/DAPOMath17k-v0").unwrapped
    chinese = next(i for i in range(base.num_problems) if re.search("[\u4e00-\u9fff]", base.problem(i).question))
    assert base.problem(chinese).prompt in base.observation_space
    assert "答" in base.action_space and "x" * (base.action_space.max_length + 1) not in base.action_space


def test_bundled_configurations():
    expected = {
        "dapo/DAPOMath17k-v0": (17_917, "dapo", "Solve the following math problem step by step."),
        "dapo/AIME24-v0": (30, "dapo", "Solve the following math problem step by step."),
        "dapo/AIME25-v0": (30, "dapo", "Solve the following math problem step by step."),
        "dapo/MATH500-v0": (500, "math_verify", "Convert the point"),
        "dapo/GSM8K-v0": (1_319, "gsm8k", "Janet"),
    }
    for env_id, (rows, verifier, prompt_start) in expected.items():
        base = gym.make(env_id).unwrapped
        assert (base.num_problems, base.verifier.name) == (rows, verifier)
        assert base.problem(0).prompt.startswith(prompt_start)
    assert gym.make("dapo/MATH500-v0").unwrapped.problem(0).prompt.endswith("within \\boxed{}.")
    assert gym.make("dapo/GSM8K-v0").unwrapped.problem(0).prompt.endswith('final answer after "####".')


def test_math_env_arguments():
    env = gym.make("dapo/Math-v0", dataset="aime24", verifier="boxed", prompt_template="Q: {problem}\nA:")
    base = env.unwrapped
    assert base.problem(0).prompt.startswith("Q: Every morning Aya")
    assert base.solution_text(base.problem(0)) == "\\boxed{204}"
    with pytest.raises(KeyError, match="no verifier named 'nope'"):
        gym.make("dapo/Math-v0", dataset="aime24", verifier="nope")
    with pytest.raises(ValueError, match="neither a template name"):
        gym.make("dapo/Math-v0", dataset="aime24", prompt_template="no placeholder")
    with pytest.raises(dapo_envs.datasets.DatasetError, match="no such file"):
        gym.make("dapo/Math-v0", dataset="/nonexistent/problems.jsonl")


def test_episode_rules():
    env = gym.make("dapo/Arithmetic-v0").unwrapped
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("Answer: 1")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="must be a str"):
        env.step(19)
    env.step("Answer: 1")
    with pytest.raises(RuntimeError, match="the episode is over"):
        env.step("Answer: 1")
    prompt, info = env.reset(options={"index": 5})
    assert info["index"] == 5 and prompt == env.problem(5).prompt
    with pytest.raises(IndexError):
        env.reset(options={"index": env.num_problems})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"problem": 1})


def test_ansi_render():
    env = gym.make("dapo/Arithmetic-v0", render_mode="ansi")
    env.reset(seed=0)
    env.step("Answer: 3")
    text = env.render()
    assert text.startswith("What is ") and "--- response ---\nAnswer: 3" in text and "reward" in text


# ----------------------------------------------------------------------------------------------------
# dapo/Arithmetic-v0
# ----------------------------------------------------------------------------------------------------


def _value(expression):
    # The test's own check of the expected value; the expression is generated, never model output.
    assert re.fullmatch(r"[0-9 +*-]+", expression)
    return eval(expression)  # noqa: S307


def test_arithmetic_default_is_small_and_plain():
    base = gym.make("dapo/Arithmetic-v0").unwrapped
    problem = base.problem(0)
    assert re.fullmatch(r"What is \d{1,2} [+-] \d{1,2}\?\n", problem.prompt)
    assert base.solution_text(problem) == f"Answer: {problem.answer}"
    assert base.observation_space.max_length <= 20
    for i in range(0, base.num_problems, 97):
        p = base.problem(i)
        assert int(p.answer) == _value(p.question) >= 0


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"difficulty": 1}, {"difficulty": 3}, {"difficulty": 4}, {"difficulty": 5}, {"digits": 1, "operators": "*"}],
)
def test_arithmetic_splits_are_disjoint(kwargs):
    train = gym.make("dapo/Arithmetic-v0", split="train", **kwargs).unwrapped
    test = gym.make("dapo/Arithmetic-v0", split="test", **kwargs).unwrapped
    sample = min(train.num_problems, 3000)
    train_questions = {p.question for p in train.sample_problems(sample, 0)}
    test_questions = {p.question for p in test.sample_problems(min(test.num_problems, 500), 0)}
    assert train_questions and test_questions and not train_questions & test_questions
    for p in list(test.sample_problems(min(test.num_problems, 50), 1)):
        assert int(p.answer) == _value(p.question)


def test_arithmetic_enumerated_split_sizes():
    train = gym.make("dapo/Arithmetic-v0").unwrapped
    test = gym.make("dapo/Arithmetic-v0", split="test").unwrapped
    all_train = {train.problem(i).question for i in range(train.num_problems)}
    all_test = {test.problem(i).question for i in range(test.num_problems)}
    assert len(all_train) == train.num_problems and len(all_test) == test.num_problems
    assert not all_train & all_test
    # 100 * 100 sums plus the non-negative differences, about a fifth of them held out.
    assert train.num_problems + test.num_problems == 100 * 100 + 100 * 101 // 2
    assert 0.15 < test.num_problems / (train.num_problems + test.num_problems) < 0.25


def test_arithmetic_arguments():
    env = ArithmeticEnv(difficulty=1)
    assert (env.operands, env.digits, env.operators) == (2, 1, ("+",))
    env = ArithmeticEnv(difficulty=4, operators="+")
    assert (env.operands, env.digits, env.operators) == (2, 2, ("+",))  # explicit arguments beat the preset
    assert set(DIFFICULTY_PRESETS) == {1, 2, 3, 4, 5}
    env = ArithmeticEnv(operands=3, digits=3, operators="+-*", allow_negative=True, num_problems=50)
    assert env.num_problems == 50
    assert any(int(env.problem(i).answer) < 0 for i in range(50))
    assert ArithmeticEnv(prompt_template="{problem}=").problem(0).prompt.endswith("=")
    for bad, message in [
        ({"operands": 1}, "operands must be"),
        ({"digits": 0}, "digits must be"),
        ({"operators": "/"}, "operators must be"),
        ({"difficulty": 9}, "difficulty must be"),
        ({"split": "validation"}, "split must be"),
        ({"num_problems": 10**9}, "has only"),
    ]:
        with pytest.raises(ValueError, match=message):
            ArithmeticEnv(**bad)


# ----------------------------------------------------------------------------------------------------
# Held-out configurations: what each id is evaluated on.
# ----------------------------------------------------------------------------------------------------

#: The bundled ids with a separate held-out split; the others are benchmarks (evaluation sets: all of
#: their problems, none held out of them).
HELD_OUT_OVERRIDES = {
    env_id: {"split": "test"}
    for env_id in (
        "dapo/Arithmetic-v0",
        "dapo/Calculator-v0",
        "dapo/Math-v0",
        "dapo/DAPOMath17k-v0",
        "dapo/MathRetry-v0",
    )
}


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_held_out_env_config_of_every_bundled_id(env_id):
    overrides = HELD_OUT_OVERRIDES.get(env_id, {})
    assert held_out_env_config(env_id) == overrides
    env_config = {"max_response_chars": 1000}
    held_out = held_out_env_config(env_id, env_config)
    assert held_out == {"max_response_chars": 1000, **overrides}
    assert env_config == {"max_response_chars": 1000}  # a new dict: the caller's is left alone
    env = gym.make(env_id, **held_out).unwrapped
    assert env.action_space.max_length == 1000
    assert held_out_overrides(env_id) == (overrides or None)
    assert type(env).held_out_overrides(gym.spec(env_id).kwargs) == (overrides or None)


def test_held_out_arithmetic_overrides_the_split_and_keeps_the_rest():
    config = held_out_env_config("dapo/Arithmetic-v0", {"split": "train", "difficulty": 1})
    assert config == {"split": "test", "difficulty": 1}
    train = gym.make("dapo/Arithmetic-v0", difficulty=1).unwrapped
    test = gym.make("dapo/Arithmetic-v0", **config).unwrapped
    train_questions = {train.problem(i).question for i in range(train.num_problems)}
    test_questions = {test.problem(i).question for i in range(test.num_problems)}
    assert test.split == "test" and test_questions and not test_questions & train_questions


class _HeldOutDigitsEnv(ArithmeticEnv):
    """A user's environment that holds out its test split at one digit."""

    held_out_env_config: ClassVar[dict[str, Any]] = {"split": "test", "digits": 1}


def _make_arithmetic(**kwargs):
    return ArithmeticEnv(**kwargs)


def test_held_out_env_config_of_user_registered_ids():
    suffix = uuid.uuid4().hex[:6]
    by_class = f"test/HeldOutClass-{suffix}-v0"
    gym.register(id=by_class, entry_point=_HeldOutDigitsEnv)  # a callable entry point
    assert held_out_env_config(by_class, {"digits": 2, "operands": 3}) == {"split": "test", "digits": 1, "operands": 3}
    by_string = f"test/HeldOutString-{suffix}-v0"
    gym.register(id=by_string, entry_point="dapo_envs.arithmetic:ArithmeticEnv")  # a "module:Class" string
    assert held_out_env_config(by_string) == {"split": "test"}
    # A factory function names no class, so it declares no held-out split.
    by_factory = f"test/HeldOutFactory-{suffix}-v0"
    gym.register(id=by_factory, entry_point=_make_arithmetic)
    assert held_out_env_config(by_factory, {"digits": 1}) == {"digits": 1}
    assert held_out_overrides(by_factory) is None
    # register_reasoning_env builds a MathEnv: a share of its data set is held out, unless told otherwise.
    data_id = f"test/HeldOutData-{suffix}-v0"
    register_reasoning_env(
        data_id, dataset=[{"prompt": "1+1", "answer": "2"}], verifier="dapo", prompt_template="plain"
    )
    assert held_out_env_config(data_id) == {"split": "test"}
    assert held_out_env_config(data_id, {"held_out_share": 0}) == {"held_out_share": 0}


def test_held_out_env_config_of_an_unregistered_id():
    with pytest.raises(ValueError, match=re.escape("'nope/Missing-v0'")):
        held_out_env_config("nope/Missing-v0")


# ----------------------------------------------------------------------------------------------------
# Registering a new environment.
# ----------------------------------------------------------------------------------------------------


def test_register_reasoning_env_with_rows_and_a_function():
    env_id = f"test/Echo-{uuid.uuid4().hex[:6]}-v0"
    register_reasoning_env(
        env_id,
        dataset=[{"prompt": "Say hi", "answer": "hi"}, {"prompt": "Say yo", "answer": "yo"}],
        verifier=lambda response, reference: response.strip() == reference,
        prompt_template="plain",
    )
    env = gym.make(env_id)
    prompt, info = env.reset(options={"index": 1})
    assert prompt == "Say yo" and info["data_source"] == "custom"
    assert env.step(" yo ")[1] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    with pytest.raises(ValueError, match="already registered"):
        register_reasoning_env(env_id, dataset="aime24", verifier="dapo", prompt_template="dapo")
    with pytest.raises(ValueError, match="already registered"):
        register_reasoning_env("dapo/AIME24-v0", dataset="aime24", verifier="dapo", prompt_template="dapo")
    with pytest.raises(KeyError, match="no verifier named"):
        register_reasoning_env(
            f"test/Bad-{uuid.uuid4().hex[:6]}-v0", dataset="aime24", verifier="x", prompt_template="dapo"
        )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs(mode):
    # Async needs shared_memory=False: Gymnasium's shared memory never refreshes Text observations.
    kwargs = {"vector_kwargs": {"shared_memory": False}} if mode == "async" else {}
    envs = gym.make_vec("dapo/Arithmetic-v0", num_envs=2, vectorization_mode=mode, **kwargs)
    try:
        prompts, infos = envs.reset(seed=0)
        assert all(p.startswith("What is ") for p in prompts)
        base = gym.make("dapo/Arithmetic-v0").unwrapped
        answers = [base.problem(int(i)).answer for i in infos["index"]]
        _, rewards, terminated, _, infos = envs.step(tuple(f"Answer: {a}" for a in answers))
        assert rewards.tolist() == [1.0, 1.0] and terminated.all() and infos["acc"].all()
    finally:
        envs.close()
