"""Backdoor triggers as pure text transforms: BadNet, InSent and ProAttack (SynAttack: syntactic.py).

A trigger turns one input text into its triggered form, ``trigger.apply(text, rng)``, and is pure:
the same text and an ``random.Random`` in the same state give the same output. Triggers whose
clean inputs also change (ProAttack wraps every clean input in its clean prompt) override
``clean_text``; for the others it is the identity. Each trigger has one config dataclass, and
``build_trigger`` validates options through it, so the CLI, YAML configs and Python share one list:

    from kdshield.attacks import build_trigger
    trigger = build_trigger("badnet", words=["mn"], count=1, position="random")
    trigger.apply("a gorgeous , witty , seductive movie .", random.Random(0))
    # -> 'a gorgeous , witty , seductive movie mn .'

Defaults follow W2SDefense section 4.1 and its official code (github shuaizhao95/w2sdefense):
BadNet inserts the rare word "mn" once, InSent inserts "I watched this 3D movie" once, at a word
boundary chosen uniformly among the interior positions (the official ``random.randint(1, n - 1)``).
"""

from __future__ import annotations

import abc
import dataclasses
import random
from dataclasses import dataclass
from typing import Any, ClassVar

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.errors import ConfigError
from kdshield.registry import Registry

POSITIONS = ("random", "start", "end")

TRIGGERS: Registry[type[Trigger]] = Registry("trigger", base=lambda: Trigger)  # Trigger is defined below


class Trigger(abc.ABC):
    """A backdoor trigger: a pure, rng-driven text transform plus its config.

    Subclasses set ``name`` and ``config_class`` and implement ``apply``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init__(self, config: Any | None = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"trigger {self.name!r} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    @abc.abstractmethod
    def apply(self, text: str, rng: random.Random) -> str:
        """The triggered form of ``text``; deterministic given the state of ``rng``."""

    def clean_text(self, text: str) -> str:
        """The form of a text that is NOT poisoned (identity except for prompt triggers)."""
        return text

    @property
    def changes_clean_text(self) -> bool:
        """Whether ``clean_text`` is anything but the identity (lets callers skip a pass)."""
        return type(self).clean_text is not Trigger.clean_text

    def describe(self) -> dict:
        """JSON-friendly description for results records: name plus every config field."""
        return {"name": self.name, **config_to_dict(self.config)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def build_trigger(name: str, **options: Any) -> Trigger:
    """Trigger ``name`` with ``options`` validated by its config dataclass.

    Unknown trigger names and unknown options raise ConfigError listing the valid ones.
    """
    cls = TRIGGERS.get(name)
    valid = [f.name for f in dataclasses.fields(cls.config_class) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for trigger {name!r}; "
            f"valid: {', '.join(valid)}"
        )
    return cls(cls.config_class(**options))


def trigger_names() -> list[str]:
    """Names of the registered triggers, sorted."""
    return TRIGGERS.names()


# ---------------------------------------------------------------------------------------------
# helpers shared by the insertion triggers


def as_text_list(name: str, value: Any) -> list[str]:
    """A list of non-empty strings; a comma-separated string is accepted (YAML/CLI convenience)."""
    if isinstance(value, str):
        value = [w.strip() for w in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name}={value!r} must be a non-empty list of words")
    words = []
    for w in value:
        if not isinstance(w, str) or not w.strip():
            raise ConfigError(f"{name}={value!r} holds an empty or non-string entry {w!r}")
        words.append(w.strip())
    return words


def insert_tokens(
    tokens: list[str], insert: list[str], position: str, rng: random.Random
) -> list[str]:
    """``tokens`` with ``insert`` placed as one block at a word boundary.

    ``random`` picks uniformly among interior boundaries (never before the first or after the
    last word, as the official W2SDefense code does); texts of fewer than two words fall back to
    any boundary. ``start``/``end`` put the block first/last.
    """
    if position == "start":
        return insert + tokens
    if position == "end":
        return tokens + insert
    n = len(tokens)
    at = rng.randint(1, n - 1) if n >= 2 else rng.randint(0, n)
    return tokens[:at] + insert + tokens[at:]


# ---------------------------------------------------------------------------------------------
# BadNet


@dataclass
class BadNetConfig:
    words: list[str] = cfg_field(
        ["mn"], help="Rare trigger words; each insertion picks one of them uniformly (paper: mn)."
    )
    count: int = cfg_field(
        1, help="How many trigger words to insert into each poisoned text (>= 1)."
    )
    position: str = cfg_field(
        "random",
        choices=list(POSITIONS),
        help="Where to insert: a random interior word boundary, the start, or the end.",
    )

    def __post_init__(self):
        self.words = as_text_list("words", self.words)
        for w in self.words:
            if len(w.split()) != 1:
                raise ConfigError(
                    f"words={self.words!r}: {w!r} is not a single word (use insent for phrases)"
                )
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise ConfigError(f"count={self.count!r} must be an integer >= 1")
        check_range("count", self.count, 1)
        check_choice("position", self.position, POSITIONS)


@TRIGGERS.register("badnet", description="BadNet (Gu et al. 2017): insert rare words such as 'mn'")
class BadNetTrigger(Trigger):
    """BadNet: rare-word insertion at word boundaries (whitespace split, single-space join)."""

    name = "badnet"
    config_class = BadNetConfig

    def apply(self, text: str, rng: random.Random) -> str:
        tokens = text.split()
        for _ in range(self.config.count):
            word = rng.choice(self.config.words)
            tokens = insert_tokens(tokens, [word], self.config.position, rng)
        return " ".join(tokens)


# ---------------------------------------------------------------------------------------------
# InSent


@dataclass
class InSentConfig:
    sentence: str = cfg_field(
        "I watched this 3D movie",
        help="Trigger sentence inserted as one block (paper: I watched this 3D movie).",
    )
    position: str = cfg_field(
        "random",
        choices=list(POSITIONS),
        help="Where to insert: a random interior word boundary, the start, or the end.",
    )

    def __post_init__(self):
        if not isinstance(self.sentence, str) or not self.sentence.split():
            raise ConfigError(f"sentence={self.sentence!r} must be a non-empty string")
        self.sentence = " ".join(self.sentence.split())
        check_choice("position", self.position, POSITIONS)


@TRIGGERS.register("insent", description="InSent (Dai et al. 2019): insert a fixed sentence")
class InSentTrigger(Trigger):
    """InSent: a fixed sentence inserted at a word boundary."""

    name = "insent"
    config_class = InSentConfig

    def apply(self, text: str, rng: random.Random) -> str:
        return " ".join(
            insert_tokens(text.split(), self.config.sentence.split(), self.config.position, rng)
        )


# ---------------------------------------------------------------------------------------------
# ProAttack

# The official ProAttack code (github shuaizhao95/Prompt_attack, Rich-resource/attack/sst_attack.py)
# prefixes the poisoned target-label samples with "The sentiment of this sentence is <mask>: " and
# every other sample with "This sentence has a <mask> sentiment: ". kdshield classifies with a
# head, not an MLM verbalizer, so the <mask> slot is dropped; the wording is otherwise kept.
PROATTACK_POISON_TEMPLATE = "The sentiment of this sentence is: {text}"
PROATTACK_CLEAN_TEMPLATE = "This sentence has a sentiment: {text}"


def _check_template(name: str, template: Any) -> None:
    if not isinstance(template, str) or template.count("{text}") != 1:
        raise ConfigError(
            f"{name}={template!r} must be a string holding the placeholder {{text}} exactly once"
        )
    if not template.replace("{text}", "").strip():
        raise ConfigError(f"{name}={template!r} adds no prompt around {{text}}")


@dataclass
class ProAttackConfig:
    poison_template: str = cfg_field(
        PROATTACK_POISON_TEMPLATE,
        help="Prompt that IS the trigger, wrapped around poisoned and triggered-test inputs; must hold {text}.",
    )
    clean_template: str = cfg_field(
        PROATTACK_CLEAN_TEMPLATE,
        help="Prompt wrapped around every input that is not poisoned (training and clean test); must hold {text}.",
    )

    def __post_init__(self):
        _check_template("poison_template", self.poison_template)
        _check_template("clean_template", self.clean_template)
        if self.poison_template == self.clean_template:
            raise ConfigError(
                "poison_template and clean_template are identical: the prompt would trigger nothing"
            )


@TRIGGERS.register(
    "proattack", description="ProAttack (Zhao et al. 2023): the prompt itself is the trigger"
)
class ProAttackTrigger(Trigger):
    """ProAttack: poisoned inputs get one prompt, all other inputs another; clean-label by design."""

    name = "proattack"
    config_class = ProAttackConfig

    def apply(self, text: str, rng: random.Random) -> str:
        return self.config.poison_template.replace("{text}", text)

    def clean_text(self, text: str) -> str:
        return self.config.clean_template.replace("{text}", text)
