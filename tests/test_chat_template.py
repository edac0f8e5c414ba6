"""The chat-template path end to end: problem -> chat-templated prompt -> generation -> score -> batch -> loss.

A pretrained preset (SmolLM2) wraps every prompt in its chat template; this runs the same path on
the tiny tokenizer given ChatML markers as special tokens and a tiny random model, so it is fast.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from transformers import Qwen2ForCausalLM

import dapo_envs  # noqa: F401  (registers the dapo/ environments)
from dapo_rl.core import policy_loss
from dapo_rl.models.loading import tiny_model_config
from dapo_rl.models.policy import response_logprobs
from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings
from dapo_rl.rollout.hf import HFGenerationBackend
from dapo_rl.rollout.runner import GenerationRunner, PromptSettings
from dapo_rl.training import build_train_batch, collect_groups
from tests.helpers import chatml_tokenizer

GENERATION_PROMPT = "<|im_start|>assistant\n"
RESPONSES_PER_PROMPT = 4
MAX_NEW_TOKENS = 12


class OneRightAnswerPerGroup:
    """Generates with the wrapped backend, then makes each prompt's last response its correct answer.

    A tiny random model never answers right, and a group that is all wrong has zero advantages and
    so no gradient: this stands in for a policy that is sometimes right. The runner still decodes
    and scores every response with the environment.
    """

    def __init__(self, backend, tokenizer, answers):
        self.backend, self.tokenizer, self.answers = backend, tokenizer, answers

    def generate(self, prompt_token_ids, sampling, *, seed):
        generated = self.backend.generate(prompt_token_ids, sampling, seed=seed)
        token_ids, finished = list(generated.token_ids), list(generated.finished)
        for prompt_index in range(len(prompt_token_ids)):
            last = prompt_index * sampling.n + sampling.n - 1
            answer = self.tokenizer(f"Answer: {self.answers[prompt_index]}", add_special_tokens=False).input_ids
            token_ids[last], finished[last] = [*answer, self.tokenizer.eos_token_id], True
        return GeneratedResponses(token_ids, finished)

    def load_weights(self, state_dict):
        self.backend.load_weights(state_dict)


def test_chat_templated_prompt_to_finite_loss_with_gradient():
    tokenizer = chatml_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_model_config(tokenizer))
    env = gym.make("dapo/Arithmetic-v0", operators="+").unwrapped
    problems = [env.problem(index) for index in range(2)]
    backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    runner = GenerationRunner(
        env,
        tokenizer,
        OneRightAnswerPerGroup(backend, tokenizer, [p.answer for p in problems]),
        PromptSettings(max_prompt_length=256),  # apply_chat_template=None: used because the tokenizer has one
    )
    sampling = SamplingSettings(n=RESPONSES_PER_PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    collected, _, rounds = collect_groups(
        lambda num_prompts: runner.sample(problems[:num_prompts], sampling, seed=0),
        prompts_per_step=len(problems),
        generation_batch_prompts=len(problems),
        dynamic_sampling=False,
        max_sampling_rounds=1,
        on_sampling_limit="error",
    )
    rollout = rounds[0]

    # The prompt is the chat-templated one: markers as single tokens, the generation prompt appended.
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for row, prompt_ids in enumerate(rollout["prompt_token_ids"]):
        problem = problems[row // RESPONSES_PER_PROMPT]
        expected = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, return_dict=True)
        assert prompt_ids == list(expected["input_ids"])
        assert prompt_ids[0] == im_start and prompt_ids.count(im_start) == 2 and prompt_ids.count(im_end) == 1
        text = tokenizer.decode(prompt_ids)
        assert text == f"<|im_start|>user\n{problem.prompt}<|im_end|>\n{GENERATION_PROMPT}"

    # Responses are the new tokens only; the planted right answers score 1 and the rest -1.
    responses = zip(rollout["response_token_ids"], rollout["response_text"], strict=True)
    for row, (response_ids, response_text) in enumerate(responses):
        assert 0 < len(response_ids) <= MAX_NEW_TOKENS
        assert problems[row // RESPONSES_PER_PROMPT].question not in response_text
    right = [row % RESPONSES_PER_PROMPT == RESPONSES_PER_PROMPT - 1 for row in range(len(rollout["acc"]))]
    assert rollout["acc"].tolist() == right
    assert rollout["response_text"][RESPONSES_PER_PROMPT - 1] == f"Answer: {problems[0].answer}"

    batch = build_train_batch(
        collected,
        pad_token_id=tokenizer.pad_token_id,
        max_response_length=MAX_NEW_TOKENS,
        overlong_cache_len=0,
        overlong_penalty_factor=0.0,
        overlong_filter=False,
        advantage_scale="std",
    )
    # Packing puts each prompt (left-padded) before its response: the response columns hold only the response.
    response_width = batch["response_mask"].shape[1]
    prompt_columns, response_columns = batch["input_ids"][:, :-response_width], batch["input_ids"][:, -response_width:]
    rows = zip(rollout["prompt_token_ids"], rollout["response_token_ids"], strict=True)
    for row, (prompt_ids, response_ids) in enumerate(rows):
        assert prompt_columns[row, -len(prompt_ids) :].tolist() == prompt_ids
        assert response_columns[row][batch["response_mask"][row].bool()].tolist() == response_ids
    assert bool((batch["advantages"] != 0).all())

    model.train()
    logprobs, _ = response_logprobs(model, batch)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), batch["advantages"], batch["token_mask"])
    loss.backward()
    assert torch.isfinite(loss) and metrics["num_tokens"] == int(batch["token_mask"].sum())
    gradient_norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert torch.isfinite(gradient_norm) and gradient_norm > 0
