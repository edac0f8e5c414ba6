"""The multi-turn environments: dapo/Calculator-v0, dapo/MathRetry-v0, ToolEnv, the turn protocol and
registering a multi-turn class. (check_env over every id: tests/test_envs.py.)"""

from __future__ import annotations

import uuid

import gymnasium as gym
import pytest

import dapo_envs
from dapo_envs import Episode, MultiTurnReasoningEnv, ToolEnv, Turn, VerifierResult, register_reasoning_env
from dapo_envs.arithmetic import ArithmeticEnv

ROWS = [{"prompt": "1 + 2", "answer": "3"}, {"prompt": "2 + 2", "answer": "4"}]


def test_new_ids_are_multi_turn_and_documented():
    assert {"dapo/Calculator-v0", "dapo/MathRetry-v0"} <= set(dapo_envs.ENV_IDS)
    for env_id in ("dapo/Calculator-v0", "dapo/MathRetry-v0"):
        assert dapo_envs.is_multi_turn(gym.make(env_id).unwrapped)
    assert not dapo_envs.is_multi_turn(gym.make("dapo/Arithmetic-v0").unwrapped)


def test_calculator_episode_through_gymnasium():
    env = gym.make("dapo/Calculator-v0", max_calls=2)
    prompt, info = env.reset(seed=0)
    problem = env.unwrapped.problem(info["index"])
    a, b = problem.question.split(" * ")
    assert "<calc>" in prompt and int(a) * int(b) == int(problem.answer) and len(a) <= 3
    observation, reward, terminated, truncated, info = env.step(f"Let me compute. <calc>{a} * {b}</calc>")
    assert (observation, reward, terminated, truncated) == (f"<result>{problem.answer}</result>", 0.0, False, False)
    assert info["turn"] == 1
    observation, *_ = env.step("<calc>9**9**9</calc>")
    assert observation.startswith("<result>error: ") and observation.endswith("</result>")
    observation, reward, terminated, truncated, info = env.step(f"Answer: {problem.answer}")
    assert (observation, reward, terminated, truncated) == (prompt, 1.0, True, False)
    assert info["acc"] and info["turn"] == 3
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("Answer: 1")
    rendered = gym.make("dapo/Calculator-v0", render_mode="ansi")
    rendered.reset(seed=0)
    rendered.step("<calc>1+1</calc>")
    assert "--- environment ---\n<result>2</result>" in rendered.render()


def test_calculator_turn_limit_truncates_and_call_reward_adds_up():
    env = gym.make("dapo/Calculator-v0", max_calls=1, call_reward=-0.1)
    env.reset(seed=1)
    _, reward, terminated, truncated, _ = env.step("<calc>1+1</calc>")
    assert (reward, terminated, truncated) == (-0.1, False, False)
    # The last turn calls again: the episode ends there (Gymnasium's truncated), scored on that turn.
    _, reward, terminated, truncated, info = env.step("<calc>2+2</calc>")
    assert (terminated, truncated, info["acc"]) == (False, True, False)
    assert reward == pytest.approx(-0.1 - 1.0)


@pytest.mark.parametrize("expression", ["9**9**9", "1" * 1_000_000, "(" * 100_000 + "1" + ")" * 100_000, "1/0", "x"])
def test_calculator_refusals_are_error_results(expression):
    env = gym.make("dapo/Calculator-v0").unwrapped
    episode = env.begin_episode(env.problem(0))
    turn = env.take_turn(episode, f"<calc>{expression}</calc>")
    assert turn.observation.startswith("<result>error: ") and episode.data["calls"] == 1


def test_calculator_arguments_and_demonstration():
    env = gym.make("dapo/Calculator-v0", digits=2, operators="+-", split="test", limits={"max_chars": 8}).unwrapped
    assert env.max_turns == 4 and env.split == "test" and env.limits.max_chars == 8
    problem = env.problem(0)
    demonstration = env.demonstration(problem)
    assert len(demonstration) == 3 and demonstration[-1] == f"Answer: {problem.answer}"
    episode = env.begin_episode(problem)
    assert env.take_turn(episode, demonstration[0]).observation == demonstration[1]
    assert env.take_turn(episode, demonstration[2]).result.acc
    train = {gym.make("dapo/Calculator-v0").unwrapped.problem(i).question for i in range(300)}
    test = {gym.make("dapo/Calculator-v0", split="test").unwrapped.problem(i).question for i in range(300)}
    assert not train & test
    with pytest.raises(ValueError, match="max_calls must be a non-negative integer"):
        gym.make("dapo/Calculator-v0", max_calls=-1)
    with pytest.raises(ValueError, match=r"demonstration_tool_share must be a number in \[0, 1\], got 1.5"):
        gym.make("dapo/Calculator-v0", demonstration_tool_share=1.5)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_calculator_demonstrations_call_the_tool_for_their_share_of_problems(share):
    env = gym.make("dapo/Calculator-v0", demonstration_tool_share=share).unwrapped
    demonstrations = [env.demonstration(env.problem(index)) for index in range(2000)]
    calling = [d for d in demonstrations if len(d) == 3]
    assert abs(len(calling) / 2000 - share) < 0.03
    assert all(d == [env.solution_text(env.problem(i))] for i, d in enumerate(demonstrations) if len(d) == 1)


def test_math_retry_rewards_shrink_with_each_try():
    env = gym.make("dapo/MathRetry-v0", dataset=ROWS, prompt_template="plain", max_tries=3).unwrapped
    for tries, expected in ((1, 1.0), (2, 0.5), (3, 0.25)):
        episode = env.begin_episode(env.problem(0))
        for _ in range(tries - 1):
            assert env.take_turn(episode, "Answer: 7").observation == dapo_envs.math_retry.DEFAULT_RETRY_MESSAGE
        turn = env.take_turn(episode, "Answer: 3")
        assert turn.result.acc and episode.episode_return == expected and not turn.turn_limit
    episode = env.begin_episode(env.problem(0))
    for _ in range(2):
        env.take_turn(episode, "Answer: 7")
    last = env.take_turn(episode, "Answer: 8")
    assert (last.result.acc, last.result.score, last.result.pred, last.turn_limit) == (False, -1.0, "8", False)
    # Stopped from outside (its token budget): the verdict on the last try.
    episode = env.begin_episode(env.problem(1))
    env.take_turn(episode, "Answer: 5")
    assert env.stop_episode(episode).pred == "5" and episode.done


def test_math_retry_arguments_are_checked():
    with pytest.raises(ValueError, match="max_tries must be an integer >= 1"):
        gym.make("dapo/MathRetry-v0", dataset=ROWS, max_tries=0)
    with pytest.raises(ValueError, match=r"retry_discount must be a number in \[0, 1\], got 2"):
        gym.make("dapo/MathRetry-v0", dataset=ROWS, retry_discount=2)


def test_turn_and_episode_rules():
    with pytest.raises(ValueError, match="exactly one of observation"):
        Turn()
    with pytest.raises(ValueError, match="exactly one of observation"):
        Turn(observation="x", result=VerifierResult(1.0, True, "1"))
    episode = Episode(problem=gym.make("dapo/Calculator-v0").unwrapped.problem(0))
    with pytest.raises(RuntimeError, match="no verdict yet"):
        _ = episode.episode_return


class Reverse(ToolEnv):
    """A tool that reverses its input (a test of ToolEnv, and of a respond that returns the wrong type)."""

    tag = "rev"

    def __init__(self, **kwargs):
        super().__init__(ArithmeticEnv(operators="+"), **kwargs)

    def tool(self, text):
        return text[::-1]


def test_register_a_multi_turn_class():
    env_id = f"test/Reverse-{uuid.uuid4().hex[:6]}-v0"
    register_reasoning_env(env_id, Reverse, max_calls=1)
    env = gym.make(env_id)
    env.reset(seed=0)
    assert env.step("<rev>abc</rev>")[0] == "<result>cba</result>"
    assert env.unwrapped.max_turns == 2
    with pytest.raises(ValueError, match="already registered"):
        register_reasoning_env(env_id, Reverse)


def test_register_refuses_what_is_not_an_environment_class():
    env_id = f"test/Bad-{uuid.uuid4().hex[:6]}-v0"
    with pytest.raises(TypeError, match=r"subclass of dapo_envs\.ReasoningEnv"):
        register_reasoning_env(env_id, dict)
    with pytest.raises(TypeError, match="missing: verifier, prompt_template"):
        register_reasoning_env(env_id, dataset=ROWS)

    class NoTurns(MultiTurnReasoningEnv):
        def __init__(self):
            super().__init__()
            self.max_turns = 0

    with pytest.raises(ValueError, match=r"NoTurns\.max_turns must be an integer >= 1, got 0"):
        register_reasoning_env(env_id, NoTurns)
    assert env_id not in gym.registry

    class WrongReply(Reverse):
        def respond(self, episode, response):
            return "<result>1</result>"

    env = WrongReply()
    with pytest.raises(TypeError, match="respond must return a Turn, got str"):
        env.take_turn(env.begin_episode(env.problem(0)), "<rev>1</rev>")


def test_a_failing_tool_is_named_with_its_call():
    class Broken(Reverse):
        def tool(self, text):
            return 1 / 0

    class NotText(Reverse):
        def tool(self, text):
            return 42

    env = Broken()
    with pytest.raises(RuntimeError, match=r"Broken.tool raised ZeroDivisionError on the call <rev>abc</rev>"):
        env.take_turn(env.begin_episode(env.problem(0)), "<rev>abc</rev>")
    env = NotText()
    with pytest.raises(TypeError, match=r"NotText\.tool must return a string, got int"):
        env.take_turn(env.begin_episode(env.problem(0)), "<rev>abc</rev>")


def test_a_multi_turn_class_without_max_turns_is_named():
    class Forgetful(MultiTurnReasoningEnv):
        def __init__(self):
            super().__init__()
            self.problems = ArithmeticEnv()

    env = Forgetful()
    with pytest.raises(ValueError, match=r"Forgetful\.max_turns must be an integer >= 1"):
        env.begin_episode(env.problems.problem(0))


def test_warm_start_demonstrations_are_checked_and_kept():
    from dapo_rl.jobs.warmstart import demonstration_turns

    env = gym.make("dapo/Calculator-v0").unwrapped
    problem = env.problem(0)
    assert demonstration_turns(env, problem) == env.demonstration(problem)

    class EvenDemonstration(Reverse):
        def demonstration(self, problem):
            return ["<rev>1</rev>", "<result>1</result>"]

    with pytest.raises(ValueError, match=r"EvenDemonstration\.demonstration must return a list of an odd number"):
        demonstration_turns(EvenDemonstration(), problem)
