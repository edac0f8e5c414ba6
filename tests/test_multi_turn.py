"""Multi-turn episodes: the runner's turn loop, environment tokens masked out of the loss, the turn and
token limits, the one-turn equality with today's path, and the chat template's turns."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

import dapo_envs  # noqa: F401  (registers the dapo/ environments)
from dapo_rl.core import policy_loss
from dapo_rl.models.loading import TINY_PRESET, build_char_tokenizer, load_policy, tiny_model_config
from dapo_rl.models.policy import response_logprobs
from dapo_rl.rollout.base import SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.rollout.vllm_backend import VLLMEngineSettings, VLLMGenerationBackend
from dapo_rl.training import build_train_batch, collect_groups
from tests.helpers import ScriptedPolicy, chatml_tokenizer, question_of, tool_user

PROMPT = "What is {problem}?\n"


def calculator(**kwargs):
    return gym.make("dapo/Calculator-v0", prompt_template=PROMPT, **kwargs).unwrapped


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def sample(env, tokenizer, policy, *, n=2, budget=64, logprobs=False, problems=2):
    runner = GenerationRunner(env, tokenizer, policy, PromptSettings(64))
    chosen = [env.problem(index) for index in range(problems)]
    return (
        runner,
        chosen,
        runner.sample(chosen, SamplingSettings(n=n, max_new_tokens=budget, logprobs=logprobs), seed=0),
    )


def test_a_tool_episode_interleaves_model_and_environment_tokens(tokenizer):
    env = calculator()
    policy = ScriptedPolicy(tokenizer, tool_user)
    _, problems, rollout = sample(env, tokenizer, policy, logprobs=True)
    eos = [tokenizer.eos_token_id]
    for row, problem in enumerate(np.repeat(problems, 2)):
        expression = problem.question.replace(" ", "")
        call = tokenizer(f"<calc>{expression}</calc>", add_special_tokens=False).input_ids + eos
        reply = tokenizer(f"<result>{problem.answer}</result>", add_special_tokens=False).input_ids
        answer = tokenizer(f"Answer: {problem.answer}", add_special_tokens=False).input_ids + eos
        assert rollout["response_token_ids"][row] == call + reply + answer
        mask = rollout["response_loss_mask"][row]
        assert mask.tolist() == [1.0] * len(call) + [0.0] * len(reply) + [1.0] * len(answer)
        behaviour = rollout["behaviour_logprobs"][row]
        assert np.isnan(behaviour[len(call) : len(call) + len(reply)]).all()
        assert (behaviour[mask == 1] == -0.5).all()
    assert rollout["acc"].all() and rollout["score"].tolist() == [1.0] * 4
    assert rollout["model_turns"].tolist() == [2] * 4 and rollout["environment_turns"].tolist() == [1] * 4
    assert not rollout["truncated"].any()
    assert rollout["response_length"].tolist() == [len(t) for t in rollout["response_token_ids"]]
    # Turn 1 samples G per prompt (shared prefill); turn 2 one per episode, on prompt + episode so far.
    (first_contexts, first), (second_contexts, second) = policy.calls
    assert (first.n, len(first_contexts)) == (2, 2) and (second.n, len(second_contexts)) == (1, 4)
    assert second_contexts[0] == rollout["prompt_token_ids"][0] + call_of(rollout, 0)


def call_of(rollout, row):
    """The episode's tokens up to its first model token after an environment turn."""
    mask = rollout["response_loss_mask"][row]
    first_reply = int(np.flatnonzero(mask == 0)[0])
    resume = first_reply + int(np.flatnonzero(mask[first_reply:] == 1)[0])
    return rollout["response_token_ids"][row][:resume]


def test_episodes_of_a_batch_end_at_different_turns(tokenizer):
    env = calculator(max_calls=3)

    def mixed(context):
        # The first problem is answered at once (wrong), the second after two calls.
        if "<result>" not in context and question_of(context) == env.problem(0).question.replace(" ", ""):
            return "Answer: 1", True
        calls = context.count("<calc>")
        return (f"<calc>{question_of(context)}</calc>", True) if calls < 2 else tool_user(context)

    policy = ScriptedPolicy(tokenizer, mixed)
    _, _, rollout = sample(env, tokenizer, policy, budget=120)
    assert rollout["model_turns"].tolist() == [1, 1, 3, 3]
    assert rollout["environment_turns"].tolist() == [0, 0, 2, 2]
    assert rollout["acc"].tolist() == [False, False, True, True]
    assert [len(contexts) for contexts, _ in policy.calls] == [2, 2, 2]  # later turns: only episodes going
    for row in range(4):
        assert rollout["response_loss_mask"][row].sum() == sum(
            len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in env_free_turns(rollout, row, tokenizer)
        )


def env_free_turns(rollout, row, tokenizer):
    """The model's turns of an episode, as text, split at EOS."""
    tokens = np.asarray(rollout["response_token_ids"][row])
    model = tokens[rollout["response_loss_mask"][row] == 1].tolist()
    text = tokenizer.decode(model, skip_special_tokens=False)
    return [turn for turn in text.split(tokenizer.eos_token) if turn]


def test_the_turn_limit_ends_an_episode_with_the_environments_verdict(tokenizer):
    env = calculator(max_calls=1)
    always_call = ScriptedPolicy(tokenizer, lambda context: (f"<calc>{question_of(context)}</calc>", True))
    _, _, rollout = sample(env, tokenizer, always_call, budget=200)
    assert rollout["model_turns"].tolist() == [2] * 4  # max_turns = max_calls + 1
    assert rollout["environment_turns"].tolist() == [1] * 4
    assert not rollout["acc"].any() and rollout["score"].tolist() == [-1.0] * 4
    assert not rollout["truncated"].any()  # ended by the environment's rule, not by the token budget
    # The last turn is a call, not an answer: the verifier concludes the episode on it.
    assert list(rollout["pred"]) == [""] * 4
    assert list(rollout["reason"]) == ["no 'Answer:' in the last 300 characters"] * 4


def expected_episode(tokenizer, problem, budget):
    """(tokens, environment_turns, finished, correct) of ``tool_user``'s episode on ``problem`` under
    ``budget`` (an answer cut just before its EOS is still correct, and still truncated)."""
    eos = [tokenizer.eos_token_id]
    call = tokenizer(f"<calc>{problem.question.replace(' ', '')}</calc>", add_special_tokens=False).input_ids + eos
    reply = tokenizer(f"<result>{problem.answer}</result>", add_special_tokens=False).input_ids
    answer = tokenizer(f"Answer: {problem.answer}", add_special_tokens=False).input_ids + eos
    if budget < len(call):
        return call[:budget], 0, False, False
    room = budget - len(call)
    if len(reply) >= room:  # cut, or fitted with no token left for the model
        return (call + reply)[:budget], int(room > 0), False, False
    whole = call + reply + answer
    return whole[:budget], 1, len(whole) <= budget, len(whole) - 1 <= budget


@pytest.mark.parametrize("budget", [10, 19, 20, 21, 30, 43, 44, 50, 58, 64])
def test_the_token_budget_counts_the_whole_episode(tokenizer, budget):
    # Problems 0 and 1 have calls and replies of different lengths: rows reach their budgets at different points.
    env = calculator()
    _, problems, rollout = sample(env, tokenizer, ScriptedPolicy(tokenizer, tool_user), budget=budget)
    assert len({len(expected_episode(tokenizer, p, 100)[0]) for p in problems}) == 2
    for row in range(4):
        tokens, environment_turns, finished, correct = expected_episode(tokenizer, problems[row // 2], budget)
        assert rollout["response_token_ids"][row] == tokens
        assert rollout["response_length"][row] == len(tokens) == len(rollout["response_loss_mask"][row]) <= budget
        assert rollout["environment_turns"][row] == environment_turns
        assert rollout["truncated"][row] == (not finished) and rollout["acc"][row] == correct


def test_a_turn_cut_by_the_budget_is_not_answered(tokenizer):
    calls = []

    class RecordingCalculator(dapo_envs.calculator_env.CalculatorEnv):
        def tool(self, text):
            calls.append(text)
            return super().tool(text)

    env = RecordingCalculator(prompt_template=PROMPT)
    # A complete call followed by text that runs out of tokens before the turn's EOS.
    chatty = ScriptedPolicy(tokenizer, lambda context: ("<calc>1+1</calc> and then" + " more" * 20, False))
    _, _, rollout = sample(env, tokenizer, chatty, budget=40)
    assert calls == [] and rollout["environment_turns"].tolist() == [0] * 4
    assert rollout["truncated"].all() and rollout["model_turns"].tolist() == [1] * 4
    assert all(mask.tolist() == [1.0] * 40 for mask in rollout["response_loss_mask"])
    finished_call = ScriptedPolicy(tokenizer, lambda context: ("<calc>1+1</calc>", True))
    sample(env, tokenizer, finished_call, budget=40)
    assert calls == ["1+1"] * 4


def test_environment_tokens_carry_no_loss_and_do_not_count(tokenizer):
    env = calculator()
    episodes = itertools.count()

    def half_right(context):
        text, done = tool_user(context)
        if text.startswith("Answer") and next(episodes) % 2:
            return "Answer: 0", True  # every other episode answers wrong: groups of mixed rewards
        return text, done

    _, _, rollout = sample(env, tokenizer, ScriptedPolicy(tokenizer, half_right), n=4, problems=4)
    collected = {
        key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        for key, value in rollout.items()
        if isinstance(value, (list, np.ndarray))
    }
    batch = build_train_batch(
        collected,
        pad_token_id=tokenizer.pad_token_id,
        max_response_length=64,
        overlong_cache_len=0,
        overlong_penalty_factor=0.0,
        overlong_filter=True,
        advantage_scale="std",
    )
    for row, mask in enumerate(rollout["response_loss_mask"]):
        assert batch["token_mask"][row, : len(mask)].tolist() == mask.tolist()
        assert batch["token_mask"][row, len(mask) :].sum() == 0
    model_tokens = sum(int(mask.sum()) for mask in rollout["response_loss_mask"])
    assert int(batch["token_mask"].sum()) == model_tokens < int(batch["response_mask"].sum())
    assert rollout["acc"].mean() == 0.5 and bool((batch["advantages"] != 0).all())
    # The token-mean counts model tokens only: changing the log-probs of environment tokens changes nothing.
    logprobs = torch.randn(batch["token_mask"].shape, generator=torch.Generator().manual_seed(0))
    loss, metrics = policy_loss(logprobs, logprobs - 0.1, batch["advantages"], batch["token_mask"])
    environment = (batch["response_mask"] == 1) & (batch["token_mask"] == 0)
    moved = torch.where(environment, logprobs + 5.0, logprobs)
    moved_loss, _ = policy_loss(moved, logprobs - 0.1, batch["advantages"], batch["token_mask"])
    assert metrics["num_tokens"] == model_tokens and torch.equal(loss, moved_loss) and loss != 0
    unmasked_loss, _ = policy_loss(moved, logprobs - 0.1, batch["advantages"], batch["response_mask"])
    assert not torch.equal(unmasked_loss, moved_loss)  # the mask is what keeps them out


def test_a_one_turn_episode_gives_exactly_todays_loss():
    """dapo/MathRetry-v0 with one try is dapo/Math-v0: same rollout, same batch, same loss, same gradient."""
    model, tokenizer = load_policy(TINY_PRESET, seed=0)
    rows = [{"prompt": f"{a} + {b}", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (7, 7)]]
    losses, gradients, rollouts = [], [], []
    for env_id, extra in (("dapo/Math-v0", {}), ("dapo/MathRetry-v0", {"max_tries": 1})):
        env = gym.make(env_id, dataset=rows, prompt_template="plain", **extra).unwrapped
        backend = HFGenerationBackend(
            model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id]
        )
        runner = GenerationRunner(env, tokenizer, backend, PromptSettings(32))
        sampling = SamplingSettings(n=4, max_new_tokens=12, logprobs=True)
        collected, _, [rollout] = collect_groups(
            lambda count: runner.sample([env.problem(i) for i in range(count)], sampling, seed=3),  # noqa: B023 (called in this iteration)
            prompts_per_step=3,
            generation_batch_prompts=3,
            dynamic_sampling=False,
            max_sampling_rounds=1,
            on_sampling_limit="error",
        )
        # A random model: score by length instead, for non-zero advantages (the same in both runs).
        collected["score"] = torch.as_tensor([(len(r) % 3) - 1.0 for r in rollout["response_token_ids"]])
        batch = build_train_batch(
            collected,
            pad_token_id=tokenizer.pad_token_id,
            max_response_length=12,
            overlong_cache_len=4,
            overlong_penalty_factor=1.0,
            overlong_filter=True,
            advantage_scale="std",
        )
        model.zero_grad(set_to_none=True)
        logprobs, _ = response_logprobs(model, batch)
        loss, _ = policy_loss(logprobs, logprobs.detach() + 0.01, batch["advantages"], batch["token_mask"])
        loss.backward()
        losses.append(loss.detach())
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        rollouts.append(rollout)
    today, one_turn = rollouts
    for key in ("prompt_token_ids", "response_token_ids", "response_text", "pred", "reason"):
        assert today[key] == one_turn[key], key
    for key in ("group_index", "truncated", "response_length", "score", "acc", "verifier_failed"):
        assert np.array_equal(today[key], one_turn[key]), key
    assert all(np.array_equal(a, b) for a, b in zip(today["behaviour_logprobs"], one_turn["behaviour_logprobs"]))
    assert all(mask.tolist() == [1.0] * len(mask) for mask in one_turn["response_loss_mask"])
    assert one_turn["model_turns"].tolist() == [1] * 12 and one_turn["truncated"].any()
    assert torch.equal(losses[0], losses[1]) and torch.equal(gradients[0], gradients[1])


def test_chat_template_episodes_are_the_templated_conversation():
    tokenizer = chatml_tokenizer()
    env = calculator()
    runner, problems, rollout = sample(env, tokenizer, ScriptedPolicy(tokenizer, tool_user), budget=100)
    problem = problems[0]
    expression = problem.question.replace(" ", "")
    conversation = [
        *problem.messages,
        {"role": "assistant", "content": f"<calc>{expression}</calc>"},
        {"role": "user", "content": f"<result>{problem.answer}</result>"},
        {"role": "assistant", "content": f"Answer: {problem.answer}"},
    ]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False)
    episode = tokenizer.decode(rollout["prompt_token_ids"][0] + rollout["response_token_ids"][0])
    # The template closes the last turn with "<|im_end|>\n"; generation stops at the EOS.
    assert episode + "\n" == expected
    assert rollout["acc"].all()
    environment = np.asarray(rollout["response_token_ids"][0])[rollout["response_loss_mask"][0] == 0]
    assert tokenizer.decode(environment.tolist()) == (
        f"\n<|im_start|>user\n<result>{problem.answer}</result><|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        runner.encode_environment_turn("x")
        == tokenizer("\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    )


def test_a_chat_template_without_the_eos_is_refused(tokenizer):
    templated = build_char_tokenizer()
    templated.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    runner = GenerationRunner(calculator(), templated, None, PromptSettings(64))
    with pytest.raises(ValueError, match="never writes the EOS token"):
        runner.encode_environment_turn("<result>1</result>")


def test_generator_logprobs_are_nan_on_environment_tokens_with_hf_generate():
    tokenizer = build_char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_model_config(tokenizer))
    backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])

    class CallFirst:
        """The model's own tokens, except that each first turn is a calculator call."""

        def generate(self, prompt_token_ids, sampling, *, seed):
            generated = backend.generate(prompt_token_ids, sampling, seed=seed)
            if sampling.n > 1:
                call = tokenizer("<calc>2*3</calc>", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                for row in range(len(generated)):
                    generated.token_ids[row], generated.finished[row] = call, True
                    generated.logprobs[row] = [-1.0] * len(call)
            return generated

    _, _, rollout = sample(calculator(), tokenizer, CallFirst(), budget=40, logprobs=True)
    for row in range(4):
        mask, behaviour = rollout["response_loss_mask"][row], rollout["behaviour_logprobs"][row]
        assert len(behaviour) == len(mask) == rollout["response_length"][row]
        assert np.isnan(behaviour[mask == 0]).all() and np.isfinite(behaviour[mask == 1]).all()
        assert (mask == 0).sum() == len("<result>6</result>")
        assert (behaviour[mask == 1][len("<calc>2*3</calc>") + 1 :] <= 0).all()  # the model's second turn


class StandInLLM:
    """Stands in for ``vllm.LLM``: answers each request (``{"prompt_token_ids"}``, SamplingParams) with a
    scripted turn, as ``RequestOutput``-like objects; records every request's parameters."""

    def __init__(self, tokenizer, turn):
        self.script = ScriptedPolicy(tokenizer, turn)
        self.requests: list[list[dict]] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.requests.append([vars(p) for p in params])
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            sampling = SamplingSettings(n=p.n, max_new_tokens=p.max_tokens)
            generated = self.script.generate([prompt["prompt_token_ids"]], sampling, seed=p.seed)
            completions = []
            for index, (tokens, done) in enumerate(zip(generated.token_ids, generated.finished)):
                # vLLM leaves the stop token out of token_ids; the backend puts it back.
                completions.append(
                    SimpleNamespace(
                        index=index,
                        token_ids=tuple(tokens[:-1] if done else tokens),
                        finish_reason="stop" if done else "length",
                        stop_reason=None,
                    )
                )
            outputs.append(SimpleNamespace(outputs=completions))
        return outputs


def test_the_vllm_backend_runs_later_turns_as_new_requests_on_stand_ins(tokenizer):
    """The vLLM side is unverified (no vLLM here): this checks the requests it would make."""
    llm = StandInLLM(tokenizer, tool_user)
    backend = object.__new__(VLLMGenerationBackend)
    backend._vllm = SimpleNamespace(SamplingParams=lambda **kwargs: SimpleNamespace(**kwargs))
    backend.settings = VLLMEngineSettings(model="/models/m")
    backend.llm, backend.asleep, backend.eos_token_ids = llm, set(), [tokenizer.eos_token_id]
    _, _, through_vllm = sample(calculator(), tokenizer, backend, budget=64)
    _, _, scripted = sample(calculator(), tokenizer, ScriptedPolicy(tokenizer, tool_user), budget=64)
    assert through_vllm["response_token_ids"] == scripted["response_token_ids"]
    assert through_vllm["acc"].all() and through_vllm["model_turns"].tolist() == [2] * 4
    first, second = llm.requests
    assert [(r["n"], r["max_tokens"]) for r in first] == [(2, 64)] * 2
    # One request per episode still going, for the room the roomiest one has left (each is cut to its own).
    room = 64 - min(len(call_of(scripted, row)) for row in range(4))
    assert [(r["n"], r["max_tokens"]) for r in second] == [(1, room)] * 4
    assert len({r["seed"] for r in first + second}) == 6


def test_math_retry_episodes_train_on_every_try_and_not_on_the_retry_message(tokenizer):
    rows = [{"prompt": "1 + 2", "answer": "3"}, {"prompt": "20 + 2", "answer": "22"}]
    env = gym.make("dapo/MathRetry-v0", dataset=rows, prompt_template="What is {problem}?\n", max_tries=3).unwrapped

    def second_try_right(context):
        """Wrong first, right after the environment's "try again"."""
        question = context.split("What is ", 1)[1].split("?", 1)[0]
        total = sum(int(term) for term in question.split("+"))
        return (f"Answer: {total}" if "Try again" in context else "Answer: 0"), True

    _, _, rollout = sample(env, tokenizer, ScriptedPolicy(tokenizer, second_try_right), budget=80)
    assert rollout["acc"].all() and rollout["score"].tolist() == [0.5] * 4
    assert rollout["model_turns"].tolist() == [2] * 4 and rollout["environment_turns"].tolist() == [1] * 4
    retry = tokenizer(env.retry_message, add_special_tokens=False).input_ids
    first = tokenizer("Answer: 0", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    for row in range(4):
        tokens, mask = rollout["response_token_ids"][row], rollout["response_loss_mask"][row]
        assert tokens[: len(first) + len(retry)] == first + retry
        assert mask.tolist() == [1.0] * len(first) + [0.0] * len(retry) + [1.0] * (
            len(tokens) - len(first) - len(retry)
        )
