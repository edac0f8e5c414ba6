"""Per-token log-probs of response tokens under a Hugging Face causal LM.

The backbone runs once over the packed batch (see :mod:`dapo_rl.rollout.batch`); the output
projection and log-softmax run through :func:`dapo_rl.core.token_logprobs` on the response
positions only, so the full-vocabulary logits of the sequence never exist at once. No Ray import:
this is the GPU-side forward, runnable where Ray is not installed.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from dapo_rl.core import token_logprobs
from dapo_rl.models.kv_cache import cache_keyword, can_share_prompt, distinct_prompts
from dapo_rl.settings import MIXED_PRECISION_CHOICES

# Config attributes that put a transform between hidden·Wᵀ and the logits; for these models the
# projection must go through the model's own head (full logits), or log-probs would be wrong.
#: Values of ``mixed_precision``: None (compute in the parameters' dtype) or "bf16".

_LOGIT_TRANSFORM_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def response_logprobs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    mixed_precision: str | None = None,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the response tokens of a packed batch.

    ``mixed_precision="bf16"`` runs the backbone under bf16 autocast and the output projection in
    bf16 (the chunked kernel reduces in float32), while the parameters, and so the optimizer's
    master weights, stay in their own dtype (float32): a 1e-6 update is not lost to bf16 rounding.

    Args:
        batch: from :func:`dapo_rl.rollout.batch.pack_sequences`: ``input_ids``, ``attention_mask``,
            ``position_ids`` (B, P+R) and ``response_mask`` (B, R).
        temperature: the sampling temperature; log-probs are of softmax(logits / temperature), the
            distribution the responses were drawn from.
        share_prompts: rows with the same prompt (a group's G responses) run that prompt through
            the backbone once and attend to its shared key/value cache; gradients from all of them
            flow back into the one prompt forward. Same values and gradients as a forward per row,
            up to float rounding. Not used with activation checkpointing (which drops the cache),
            a model whose head transforms the logits, or an architecture not verified with a shared
            cache (:func:`dapo_rl.models.kv_cache.shared_prompt_unsupported`, said once as a warning).

    Returns:
        ``(logprobs, entropy)``, each (B, R) float32 with zeros at masked positions; ``entropy`` is
        None unless ``return_entropy``.
    """
    input_ids = batch["input_ids"]
    response_mask = batch["response_mask"].bool()
    response_width = response_mask.shape[1]
    prompt_width = input_ids.shape[1] - response_width
    response_tokens = input_ids[:, prompt_width:][response_mask]
    # Column t of the response is predicted by the position one to its left.
    predicting = slice(prompt_width - 1, prompt_width - 1 + response_width)

    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {mixed_precision!r}")
    device_type = input_ids.device.type
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    if _has_logit_transform(model):
        # The model's own forward applies its soft-capping or scaling; this holds the full logits.
        with autocast:
            logits = _forward(model, batch).logits[:, predicting][response_mask].float() / temperature
        log_softmax = torch.log_softmax(logits, dim=-1)
        flat_logprobs = log_softmax.gather(-1, response_tokens[:, None]).squeeze(-1)
        flat_entropy = -(log_softmax.exp() * log_softmax).sum(-1) if return_entropy else None
    else:
        backbone = model.get_decoder()
        with autocast:
            if share_prompts and not getattr(backbone, "gradient_checkpointing", False) and can_share_prompt(model):
                hidden = _shared_prompt_hidden(backbone, batch, prompt_width)[response_mask]
            else:
                hidden = _forward(backbone, batch).last_hidden_state[:, predicting][response_mask]
        weight = model.get_output_embeddings().weight
        if mixed_precision == "bf16":
            # Explicit casts (autocast stays off inside the custom kernel); gradients flow back
            # through them to the float32 parameters.
            hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        result = token_logprobs(
            hidden,
            weight,
            response_tokens,
            temperature=temperature,
            chunk_size=chunk_size,
            return_entropy=return_entropy,
        )
        flat_logprobs, flat_entropy = result if return_entropy else (result, None)

    logprobs = _scatter_rows(flat_logprobs, response_mask)
    entropy = _scatter_rows(flat_entropy, response_mask) if flat_entropy is not None else None
    return logprobs, entropy


class ResponseLogprobs(torch.nn.Module):
    """:func:`response_logprobs` as a module, so that its ``forward`` is the one entry point.

    Sharded data parallelism (FSDP2) gathers a unit's weights in hooks around its ``forward``; with
    this module as the root unit, the output head's weight, which the chunked kernel reads
    directly, is gathered for the whole computation (see :mod:`dapo_rl.models.distributed`).
    """

    def __init__(
        self,
        causal_lm: PreTrainedModel,
        *,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        mixed_precision: str | None = None,
        share_prompts: bool = True,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.mixed_precision = mixed_precision
        self.share_prompts = share_prompts

    def forward(self, batch: dict[str, torch.Tensor], return_entropy: bool = False):
        return response_logprobs(
            self.causal_lm,
            batch,
            temperature=self.temperature,
            return_entropy=return_entropy,
            chunk_size=self.chunk_size,
            mixed_precision=self.mixed_precision,
            share_prompts=self.share_prompts,
        )


def _forward(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
    return module(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )


def _shared_prompt_hidden(backbone: torch.nn.Module, batch: dict[str, torch.Tensor], prompt_width: int) -> torch.Tensor:
    """Hidden states at the (B, R) positions that predict the response tokens, each distinct prompt run once.

    The distinct prompts (U of them) go through the backbone with a KV cache; the cache is then
    indexed out to the B rows (an autograd-tracked gather, so each row's gradient reaches its
    prompt's one forward) and the responses run on top of it. Column t of the result predicts
    response token t: the last prompt position for t = 0, response position t - 1 after that.
    """
    input_ids, attention_mask, position_ids = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    first_rows, inverse = distinct_prompts(input_ids[:, :prompt_width], attention_mask[:, :prompt_width])
    if len(first_rows) == len(inverse):  # nothing shared: one plain forward is cheaper
        return _forward(backbone, batch).last_hidden_state[:, prompt_width - 1 : -1]
    keyword = cache_keyword(backbone)
    cache = DynamicCache()
    prompt_hidden = backbone(
        input_ids=input_ids[first_rows, :prompt_width],
        attention_mask=attention_mask[first_rows, :prompt_width],
        position_ids=position_ids[first_rows, :prompt_width],
        use_cache=True,
        **{keyword: cache},
    ).last_hidden_state
    cache.batch_select_indices(inverse)
    response_hidden = backbone(
        input_ids=input_ids[:, prompt_width:],
        attention_mask=attention_mask,  # the whole row: the responses attend to the cached prompt
        position_ids=position_ids[:, prompt_width:],
        use_cache=True,
        **{keyword: cache},
    ).last_hidden_state
    return torch.cat([prompt_hidden[inverse, -1:], response_hidden[:, :-1]], dim=1)


def _has_logit_transform(model: PreTrainedModel) -> bool:
    return any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORM_ATTRIBUTES)


def _scatter_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place N values back at the True positions of a (B, R) mask; zeros elsewhere."""
    full = flat.new_zeros(mask.shape, dtype=torch.float32)
    return full.masked_scatter(mask, flat.float())
