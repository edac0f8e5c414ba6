"""Generation with Hugging Face ``generate`` (KV cache, batched), for CPU runs and small GPUs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from dapo_rl.models.kv_cache import cache_keyword, can_share_prompt
from dapo_rl.rollout.base import GeneratedResponses, SamplingSettings
from dapo_rl.rollout.batch import split_at_eos


class SampledTokenLogprobs(LogitsProcessor):
    """Records the log-prob of each token ``generate`` samples, under the generating weights.

    ``generate`` applies custom processors before its temperature and top-k/top-p warpers, so this
    one sees the model's logits and takes log_softmax(logits / temperature): the distribution the
    learner's log-probs are computed over. The sampled token is known only at the next call (it is
    then the last input id), so one (rows, vocab) row of log-probs is held at a time, not one per
    step; :meth:`finish` takes the last token's. The scores are returned unchanged: sampling (and
    the random stream) is the same with or without it.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            # Kept on the generating device: one copy to the host in finish(), not a sync per token.
            self.steps.append(self._pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self._pending = None

    def finish(self, output_ids: torch.Tensor) -> torch.Tensor:
        """(rows, generated tokens) log-probs, given ``generate``'s output ids."""
        self._take(output_ids[:, -1])
        steps, self.steps = self.steps, []
        if not steps:
            return torch.zeros((len(output_ids), 0))
        return torch.stack(steps, dim=1).cpu()


def generation_device(setting: str = "auto") -> torch.device:
    """Where to generate: ``"auto"`` is the GPU when this process sees one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class HFGenerationBackend:
    """Samples responses with ``model.generate`` on the model it holds.

    Args:
        model: a causal LM; it is switched to eval mode for generation only.
        pad_token_id: id used to left-pad prompts.
        eos_token_ids: ids that end a response.
        prompts_per_call: prompts per ``generate`` call (each call holds ``prompts_per_call × n``
            sequences and their KV cache).
        share_prompt_prefill: run each prompt through the model once and copy its KV cache to its
            ``n`` samples, instead of ``generate``'s ``n`` identical prefills. The same
            computation (the samples' distribution is unchanged), about ``n`` times less prefill
            work; off for architectures not verified with a shared cache
            (:func:`dapo_rl.models.kv_cache.shared_prompt_unsupported`, said once as a warning).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        prompts_per_call: int = 64,
        share_prompt_prefill: bool = True,
    ) -> None:
        if prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be >= 1, got {prompts_per_call}")
        if not eos_token_ids:
            raise ValueError("eos_token_ids is empty: responses could never finish")
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.prompts_per_call = prompts_per_call
        self.share_prompt_prefill = share_prompt_prefill

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    @torch.inference_mode()
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingSettings, *, seed: int
    ) -> GeneratedResponses:
        # A fresh config, so that nothing a checkpoint's generation_config.json sets (top_k=50,
        # repetition penalties) silently changes the sampling distribution the loss assumes.
        # generate() merges the model's own generation_config into fields left at their defaults,
        # so that one is swapped for a blank one during the call as well.
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
        )
        was_training = self.model.training
        model_generation_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        self.model.eval()
        device = next(self.model.parameters()).device
        token_ids: list[list[int]] = []
        finished: list[bool] = []
        logprobs: list[list[float]] | None = [] if sampling.logprobs else None
        try:
            # HF generate draws from the global RNG: seed it here and restore the caller's state after.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for start in range(0, len(prompt_token_ids), self.prompts_per_call):
                    chunk = prompt_token_ids[start : start + self.prompts_per_call]
                    input_ids, attention_mask = _left_pad(chunk, self.pad_token_id, device)
                    recorder = SampledTokenLogprobs(sampling.temperature) if sampling.logprobs else None
                    processors = LogitsProcessorList([recorder] if recorder else [])
                    if (
                        self.share_prompt_prefill
                        and sampling.n > 1
                        and input_ids.shape[1] > 1
                        and can_share_prompt(self.model)
                    ):
                        output = self._generate_from_shared_prefill(
                            input_ids, attention_mask, sampling.n, generation_config, processors
                        )
                    else:
                        output = self.model.generate(
                            input_ids=input_ids,
                            attention_mask=attention_mask,
                            generation_config=generation_config,
                            logits_processor=processors,
                        )
                    chunk_logprobs = recorder.finish(output).tolist() if recorder else None
                    for index, row in enumerate(output[:, input_ids.shape[1] :].tolist()):
                        response, done = split_at_eos(row, self.eos_token_ids)
                        token_ids.append(response)
                        finished.append(done)
                        if logprobs is not None:
                            logprobs.append(chunk_logprobs[index][: len(response)])
        finally:
            self.model.train(was_training)
            self.model.generation_config = model_generation_config
        return GeneratedResponses(token_ids=token_ids, finished=finished, logprobs=logprobs)

    def _generate_from_shared_prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n: int,
        generation_config: GenerationConfig,
        processors: LogitsProcessorList,
    ) -> torch.Tensor:
        """``generate`` for ``n`` samples per prompt, with each prompt's prefill computed once.

        All prompt tokens but the last go through the model once per prompt; the cache is then
        repeated ``n`` times and ``generate`` continues from it, feeding the last prompt token
        itself (it needs at least one uncached token to produce the first logits). Positions are
        counted over real tokens, as ``generate`` counts them for left-padded prompts.
        """
        cached_ids, cached_mask = input_ids[:, :-1], attention_mask[:, :-1]
        cache = DynamicCache()
        keyword = cache_keyword(self.model)
        # The backbone alone: only the cache is wanted, not the vocabulary projection.
        self.model.get_decoder()(
            input_ids=cached_ids,
            attention_mask=cached_mask,
            position_ids=(cached_mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            **{keyword: cache},
        )
        cache.batch_repeat_interleave(n)
        per_sample = generation_config.to_dict()
        per_sample["num_return_sequences"] = 1
        return self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=attention_mask.repeat_interleave(n, dim=0),
            generation_config=GenerationConfig(**per_sample),
            logits_processor=processors,
            **{keyword: cache},
        )


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)
