"""Prompt templates by name. A template is a string with a ``{problem}`` placeholder.

Only ``{problem}`` is substituted (``str.replace``, not ``str.format``), so LaTeX braces such as
``\\boxed{}`` in a template need no escaping.

===========  =====================================================================================
``dapo``     The DAPO prompt (DAPO-Math-17k and AIME in the paper's recipe): asks for a last line
             ``Answer: $Answer``; pair it with the ``dapo`` verifier.
``boxed``    The Qwen2.5-Math / DeepSeek-R1 chain-of-thought prompt: the final answer in
             ``\\boxed{}``; pair it with ``math_verify`` or ``boxed``.
``gsm8k``    verl's GSM8K prompt: the final answer after ``####``; pair it with ``gsm8k``.
``plain``    The problem alone.
===========  =====================================================================================
"""

from __future__ import annotations

from dapo_envs.datasets import DAPO_PROMPT_PREFIX, DAPO_PROMPT_SUFFIX

__all__ = ["PROMPT_TEMPLATES", "resolve_template", "render"]

PLACEHOLDER = "{problem}"

PROMPT_TEMPLATES: dict[str, str] = {
    "dapo": DAPO_PROMPT_PREFIX + PLACEHOLDER + DAPO_PROMPT_SUFFIX,
    "boxed": PLACEHOLDER + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": PLACEHOLDER + ' Let\'s think step by step and output the final answer after "####".',
    "plain": PLACEHOLDER,
}


def resolve_template(template: str) -> str:
    """A template name from :data:`PROMPT_TEMPLATES`, or a literal template containing ``{problem}``."""
    if not isinstance(template, str):
        raise TypeError(f"prompt_template must be a string, got {type(template).__name__}")
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if PLACEHOLDER not in template:
        raise ValueError(
            f"prompt_template {template[:60]!r} is neither a template name ({', '.join(PROMPT_TEMPLATES)}) "
            f"nor a string containing {PLACEHOLDER!r}"
        )
    return template


def render(template: str, problem: str) -> str:
    """``template`` with ``{problem}`` replaced by ``problem`` (``template`` already resolved)."""
    return template.replace(PLACEHOLDER, problem)
