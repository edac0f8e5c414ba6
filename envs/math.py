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

from dapo_envs import datasets, held_out, prompts
from dapo_envs.base import DEFAULT_MAX_RESPONSE_CHARS, Problem, ReasoningEnv, is_number, printable
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
        self._fractions: list[float] | None = None
        self._normalized: frozenset[str] | None = None

    def fractions(self) -> list[float]:
        """Each problem's :func:`~dapo_envs.held_out.held_out_fraction` (computed once)."""
        if self._fractions is None:
            self._fractions = [held_out.held_out_fraction(question) for question in self.questions]
        return self._fractions

    def normalized(self) -> frozenset[str]:
        """Every problem's normalized text (computed once)."""
        if self._normalized is None:
            self._normalized = frozenset(map(held_out.normalized_problem, self.questions))
        return self._normalized


def _load(dataset: Any, argument: str) -> pa.Table:
    try:
        return datasets.load(dataset)
    except (datasets.DatasetError, TypeError) as error:  # its message names the file or row; this, the argument
        raise type(error)(f"{argument}: {printable(str(error))}") from None


def _name(dataset: Any) -> str:
    return printable(dataset) if isinstance(dataset, str) else type(dataset).__name__


def data_set_held_out(env_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The held-out overrides of a data-set environment made with ``env_config``: ``split="test"``
    when it has a ``test_dataset`` or a held-out share (the default), None with ``held_out_share=0``."""
    share = env_config.get("held_out_share")
    if env_config.get("test_dataset") is not None or share is None or not is_number(share) or share > 0:
        return {"split": "test"}
    return None


def select_split(
    dataset: Any, split: str, test_dataset: Any, held_out_share: float | None
) -> tuple[_PreparedDataset, Sequence[int], float]:
    """(the prepared problems, the rows of ``split`` in them, the share applied) of a data-set environment.

    ``split="test"``: every problem of ``test_dataset``, else the problems of ``dataset`` whose hash falls
    below the share (:func:`dapo_envs.held_out.in_held_out_share`). ``split="train"``: the problems of
    ``dataset`` not in the test split (with a ``test_dataset``: none whose normalized text is in it).
    """
    if not isinstance(split, str) or split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    held_out.check_share(held_out_share, test_dataset)
    share = held_out.resolved_share(held_out_share, test_dataset)
    data = _prepare(_load(dataset, "dataset"))
    test = _prepare(_load(test_dataset, "test_dataset")) if test_dataset is not None else None
    rows: Sequence[int]
    if split == "test" and test is not None:
        data, rows = test, range(len(test.questions))
    elif split == "test" and share == 0:
        raise ValueError(
            f"split='test' but dataset {_name(dataset)} has no held-out problems (held_out_share is 0 and no "
            "test_dataset is given)"
        )
    elif test is not None:
        excluded = test.normalized()
        rows = [i for i, q in enumerate(data.questions) if held_out.normalized_problem(q) not in excluded]
    elif share > 0:
        fractions = data.fractions()
        rows = [i for i, f in enumerate(fractions) if (f < share) == (split == "test")]
    else:
        rows = range(len(data.questions))
    if not rows:
        source = f"test_dataset {_name(test_dataset)}" if test_dataset is not None else f"held_out_share={share}"
        raise ValueError(
            f"the {split} split of dataset {_name(dataset)} is empty ({source} leaves it no problems); "
            "change held_out_share or give a test_dataset"
        )
    return data, rows, share


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
    - ``split``: ``"train"`` (default) or ``"test"``, the held-out problems: those of ``test_dataset``
      when it is given (the ``train`` split then leaves out any problem also in it), else the share
      ``held_out_share`` of ``dataset`` whose hash of the problem text falls below it
      (:mod:`dapo_envs.held_out`; the same split in every run, seed and process). ``train`` and
      ``test`` never share a problem.
    - ``test_dataset``: a data set of held-out problems, in any form ``dataset`` takes (default None).
    - ``held_out_share``: the share of ``dataset`` carved out as held-out problems when there is no
      ``test_dataset``, in [0, 1) (default None: 0.1, or 0 with a ``test_dataset``). 0 trains on every
      problem and leaves none held out (``dapo-rl train`` then needs ``eval_env``).
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
        split: str = "train",
        test_dataset: str | pa.Table | Sequence[Mapping[str, Any]] | None = None,
        held_out_share: float | None = None,
        verifier_timeout: float | None = None,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(render_mode=render_mode)
        self._set_verifier(verifier, verifier_timeout)
        self.prompt_template = prompts.resolve_template(prompt_template)
        self.dataset_name = dataset if isinstance(dataset, str) else type(dataset).__name__
        self._data, self._rows, self.held_out_share = select_split(dataset, split, test_dataset, held_out_share)
        self.split = split
        placeholders = self.prompt_template.count(prompts.PLACEHOLDER)
        template_chars = frozenset(self.prompt_template.replace(prompts.PLACEHOLDER, ""))
        max_prompt_length = len(self.prompt_template) + placeholders * (
            self._data.max_question_length - len(prompts.PLACEHOLDER)
        )
        self._set_spaces(self._data.charset | template_chars, max_prompt_length, max_response_chars)

    @classmethod
    def held_out_overrides(cls, env_config: Mapping[str, Any]) -> dict[str, Any] | None:
        return data_set_held_out(env_config)

    @property
    def num_problems(self) -> int:
        return len(self._rows)

    def problem(self, index: int) -> Problem:
        if not 0 <= index < self.num_problems:
            raise IndexError(f"problem index {index} is outside 0..{self.num_problems - 1}")
        row = self._rows[index]
        question = self._data.questions[row]
        return Problem(
            index=index,
            problem_id=self._data.ids[row],
            data_source=self._data.data_sources[row],
            question=question,
            prompt=prompts.render(self.prompt_template, question),
            answer=self._data.answers[row],
        )
