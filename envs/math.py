"""dapo/Math-v0: math problems from a data set, scored by a verifier chosen by name.

The bundled benchmark ids are configurations of this environment:

=======================  =================  ===============  ===============
id                       dataset            verifier         prompt_template
=======================  =================  ===============  ===============
``dapo/Math-v0``         ``dapo_math_17k``  ``dapo``         ``dapo``
``dapo/DAPOMath17k-v0``  ``dapo_math_17k``  ``dapo``         ``dapo``
``dapo/AIME24-v0``       ``aime24``         ``dapo``         ``dapo``
``dapo/AIME25-v0``       ``aime25``         ``dapo``         ``dapo``
``dapo/MATH500-v0``      ``math500``        ``math_verify``  ``boxed``
``dapo/GSM8K-v0``        ``gsm8k``          ``gsm8k``        ``gsm8k``
=======================  =================  ===============  ===============
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from dapo_envs import datasets, prompts
from dapo_envs.base import DEFAULT_MAX_RESPONSE_CHARS, Problem, ReasoningEnv, printable
from dapo_envs.verifiers import Verifier

__all__ = ["MathEnv"]


class _PreparedDataset:
    """A loaded problem set as Python lists, plus what the observation space needs."""

    def __init__(self, table: pa.Table) -> None:
        self.ids: list[str] = table.column("id").to_pylist()
        self.questions: list[str] = table.column("prompt").to_pylist()
        self.answers: list[str] = table.column("answer").to_pylist()
        self.data_sources: list[str] = table.column("data_source").to_pylist()
        self.charset = frozenset("".join(self.questions))
        self.max_question_length = max(map(len, self.questions))


# Making an env for the same file again (check_env does, so do vector envs) reuses the parsed lists.
_PREPARED: collections.OrderedDict[int, tuple[pa.Table, _PreparedDataset]] = collections.OrderedDict()
_PREPARED_LOCK = threading.Lock()


def _prepare(table: pa.Table) -> _PreparedDataset:
    with _PREPARED_LOCK:
        cached = _PREPARED.get(id(table))
        if cached is not None and cached[0] is table:
            _PREPARED.move_to_end(id(table))
            return cached[1]
    prepared = _PreparedDataset(table)
    with _PREPARED_LOCK:
        _PREPARED[id(table)] = (table, prepared)  # holding the table keeps its id from being reused
        while len(_PREPARED) > 8:
            _PREPARED.popitem(last=False)
    return prepared


class MathEnv(ReasoningEnv):
    """Math problems from a data set; the reward is a verifier's verdict on the response.

    ## Description

    One episode is one problem of the data set: ``reset`` shows the problem inside the prompt template,
    ``step`` takes the model's complete response, scores it against the reference answer with the
    verifier, and ends the episode. Problems are drawn uniformly with the seeded ``np_random``
    (``reset(options={"index": i})`` picks one). For batched training use the trainer protocol of
    :class:`~dapo_envs.base.ReasoningEnv` (``problem``, ``sample_problems``, ``score``).

    ## Observation

    The rendered prompt (plain text), in a ``gymnasium.spaces.Text`` whose charset is every character
    of the data set's problems and the template, and whose ``max_length`` is the longest prompt.
    ``Problem.messages`` gives the same text as a one-user-turn chat.

    ## Action

    The complete response text: a :class:`~dapo_envs.base.ResponseText` (any string of at most
    ``max_response_chars`` characters).

    ## Reward

    The verifier's score: +1.0 when correct, -1.0 otherwise for the built-in verifiers (a time-out or
    a response without an answer is wrong). ``terminated`` is always True after the one step; the step
    info holds ``acc``, ``score``, ``pred``, ``ground_truth``, ``reason``, ``problem_id``,
    ``data_source`` and ``index``.

    ## Arguments

    - ``dataset``: a bundled name (``dapo_math_17k``, ``aime24``, ``aime25``, ``math500``, ``gsm8k``), a
      ``.parquet`` / ``.jsonl`` path in the verl or plain problem/answer schema, a ``pyarrow.Table`` or a
      list of ``{"prompt", "answer"}`` dicts (see :func:`dapo_envs.datasets.load`). Default
      ``"dapo_math_17k"``.
    - ``verifier``: a registered verifier name (``dapo``, ``math_verify``, ``boxed``, ``gsm8k``, or
      your own), a ``Verifier``, or a function ``(response, reference) -> VerifierResult``. Default
      ``"dapo"``.
    - ``prompt_template``: a template name (``dapo``, ``boxed``, ``gsm8k``, ``plain``) or a string
      containing ``{problem}``. Default ``"dapo"``.
    - ``verifier_timeout``: per-response time limit in seconds for verifiers that run in worker
      processes (default: the verifier's own, 1 s).
    - ``max_response_chars``: ``max_length`` of the action space (default 200,000).
    - ``render_mode``: ``None`` or ``"ansi"`` (``render()`` returns the prompt, response and verdict).
    """

    def __init__(
        self,
        dataset: str | pa.Table | Sequence[Mapping[str, Any]] = "dapo_math_17k",
        verifier: str | Verifier | Callable[[str, str], Any] = "dapo",
        prompt_template: str = "dapo",
        *,
        verifier_timeout: float | None = None,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(render_mode=render_mode)
        self._set_verifier(verifier, verifier_timeout)
        self.prompt_template = prompts.resolve_template(prompt_template)
        self.dataset_name = dataset if isinstance(dataset, str) else type(dataset).__name__
        try:
            table = datasets.load(dataset)
        except (datasets.DatasetError, TypeError) as error:  # its message names the file or row; this, the argument
            raise type(error)(f"dataset: {printable(str(error))}") from None
        self._data = _prepare(table)
        placeholders = self.prompt_template.count(prompts.PLACEHOLDER)
        template_chars = frozenset(self.prompt_template.replace(prompts.PLACEHOLDER, ""))
        max_prompt_length = len(self.prompt_template) + placeholders * (
            self._data.max_question_length - len(prompts.PLACEHOLDER)
        )
        self._set_spaces(self._data.charset | template_chars, max_prompt_length, max_response_chars)

    @property
    def num_problems(self) -> int:
        return len(self._data.questions)

    def problem(self, index: int) -> Problem:
        if not 0 <= index < self.num_problems:
            raise IndexError(f"problem index {index} is outside 0..{self.num_problems - 1}")
        question = self._data.questions[index]
        return Problem(
            index=index,
            problem_id=self._data.ids[index],
            data_source=self._data.data_sources[index],
            question=question,
            prompt=prompts.render(self.prompt_template, question),
            answer=self._data.answers[index],
        )
