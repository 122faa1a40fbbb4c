"""Programmatic rewards for the RL stage: plain Python callables that score responses, for tasks whose answers can
be checked (arithmetic, formats, keywords) instead of judged by a learned reward model.

Any class whose instances follow :class:`RewardFunction` works; name it in the PPO config by class path:

.. code-block:: yaml

    model:
      init_args:
        reward_model: null
        reward_fn:
          class_path: minillm_lightning.rewards.ArithmeticReward
          init_args: {partial_credit: 0.5}
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Protocol, runtime_checkable

from minillm_lightning.errors import MiniLLMError


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch of responses: ``prompts[i]`` is the last user message the policy answered, ``responses[i]``
    the decoded reply (stop token removed). Returns one float per response, higher is better."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class ContainsReward:
    """``reward`` when the response contains ``target``, else ``otherwise``.

    A deliberately simple signal for smoke tests and demos (it is trivially hackable: the policy learns to say
    the word, whatever the question).

    Args:
        target: the text to look for.
        reward: score of a response that contains it.
        otherwise: score of a response that does not.
        case_sensitive: compare case-sensitively.
    """

    def __init__(self, target: str, reward: float = 1.0, otherwise: float = 0.0, case_sensitive: bool = True) -> None:
        if not target:
            raise ValueError("ContainsReward: target must be a non-empty string")
        self.target, self.reward, self.otherwise, self.case_sensitive = target, reward, otherwise, case_sensitive

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        target = self.target if self.case_sensitive else self.target.lower()
        out = []
        for r in responses:
            text = r if self.case_sensitive else r.lower()
            out.append(self.reward if target in text else self.otherwise)
        return out


# questions: "What is 3 plus 4?" / "3加4等于几？"
# answers, as in the shipped SFT data: "3 plus 4 equals 7." / "3加4等于7。"
_QUESTION = [re.compile(r"(\d+)\s*plus\s*(\d+)", re.IGNORECASE), re.compile(r"(\d+)\s*加\s*(\d+)")]
_ANSWER = [
    re.compile(r"(\d+)\s*plus\s*(\d+)\s*(?:equals|is|=)\s*(\d+)", re.IGNORECASE),
    re.compile(r"(\d+)\s*加\s*(\d+)\s*(?:等于|是|=)\s*(\d+)"),
]
_NUMBER = re.compile(r"\d+")


class ArithmeticReward:
    """Verifiable reward for the addition questions of the sample prompts (English and Chinese).

    For a prompt asking ``a plus b`` (``a加b``):

    - ``correct`` when the response states the sum in full with the prompt's operands, e.g. "3 plus 4 equals 7"
      or "3加4等于7";
    - ``partial_credit`` when it does not, but the last number it contains is the right sum ("It is 7.");
    - ``wrong`` otherwise (a wrong sum, no number, or a statement about other operands).

    Prompts that ask no addition get ``other`` (a constant, so they neither help nor hurt).
    """

    def __init__(
        self, correct: float = 1.0, partial_credit: float = 0.5, wrong: float = 0.0, other: float = 0.0
    ) -> None:
        self.correct, self.partial_credit, self.wrong, self.other = correct, partial_credit, wrong, other

    @staticmethod
    def operands(prompt: str) -> tuple[int, int] | None:
        """(a, b) of an addition question, or None."""
        for pattern in _QUESTION:
            m = pattern.search(prompt)
            if m:
                return int(m.group(1)), int(m.group(2))
        return None

    def score(self, prompt: str, response: str) -> float:
        ab = self.operands(prompt)
        if ab is None:
            return self.other
        a, b = ab
        statements = [tuple(int(g) for g in m.groups()) for p in _ANSWER for m in p.finditer(response)]
        for x, y, c in statements:
            if {x, y} == {a, b}:  # "4 plus 3 equals 7" answers "3 plus 4" too
                return self.correct if c == a + b else self.wrong
        if statements:  # a sum of other operands ("8 plus 6 equals 14" for 7 plus 7) earns nothing
            return self.wrong
        numbers = _NUMBER.findall(response)
        if numbers and int(numbers[-1]) == a + b:
            return self.partial_credit
        return self.wrong

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def load_reward_function(spec: str | dict[str, Any] | RewardFunction | type) -> RewardFunction:
    """Instantiate a reward function from ``"package.module.Class"`` or ``{"class_path": ..., "init_args": {...}}``.

    From Python, a reward function itself (an instance such as ``ArithmeticReward(partial_credit=0.2)``, or any
    callable ``fn(prompts, responses) -> list[float]``) is used as it is, and a class is instantiated without
    arguments."""
    if isinstance(spec, type):
        try:
            spec = spec()
        except TypeError as e:
            raise MiniLLMError(
                f"reward_fn {spec.__qualname__}: cannot be built without arguments ({e}); pass an instance instead"
            ) from None
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise MiniLLMError(
            f"reward_fn must be a class path, {{class_path: ..., init_args: {{...}}}} or (from Python) a callable "
            f"fn(prompts, responses) -> list[float], got {spec!r}"
        )
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise MiniLLMError(f"reward_fn: unexpected keys {sorted(unknown)}; only class_path and init_args are read")
    path, args = spec["class_path"], spec.get("init_args") or {}
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise MiniLLMError(
            f"reward_fn class_path {path!r} cannot be imported ({e}); use a full path such as "
            f"minillm_lightning.rewards.ArithmeticReward"
        ) from None
    try:
        fn = cls(**args)
    except TypeError as e:
        raise MiniLLMError(f"reward_fn {path}: bad init_args {args} ({e})") from None
    if not callable(fn):
        raise MiniLLMError(f"reward_fn {path} is not callable; it must implement __call__(prompts, responses)")
    return fn


def describe_reward_function(spec: Any) -> Any:
    """What the hyper-parameters record of a ``reward_fn``: a class path or dict as given; for a Python object
    (an instance or a function) its class path (or function path), since checkpoints hold plain data only
    (``torch.load(weights_only=True)`` reads them)."""
    if spec is None or isinstance(spec, (str, dict)):
        return spec
    target = spec if hasattr(spec, "__qualname__") else type(spec)  # a class or function, else an instance
    return f"{target.__module__}.{target.__qualname__}"
