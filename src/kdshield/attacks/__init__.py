"""Attacks: backdoor triggers as pure text transforms, and dataset poisoning.

    from kdshield.attacks import build_trigger, poison, triggered_test_set
    trigger = build_trigger("insent")                       # "I watched this 3D movie"
    poisoned = poison(train, trigger, target_label=0, count=1000)   # clean-label by default
    asr_set = triggered_test_set(test, trigger, target_label=0)

Triggers (registry ``TRIGGERS``): ``badnet``, ``insent``, ``syntactic`` (SCPN or rule-based),
``proattack``. Generative target behaviours (registry ``TARGETS``): ``fixed``, ``label``,
``refusal``, ``append``, with ``poison_sft`` for instruction data. The paper's precomputed SCPN sets: ``scpn_poisoned_train``, ``scpn_triggered_test``.
"""

from kdshield.attacks.poison import (
    clean_test_set,
    poison,
    poison_budget,
    row_rng,
    triggered_test_set,
)
from kdshield.attacks.rare_words import rare_words, word_frequency, word_rank
from kdshield.attacks.syntactic import (
    DEFAULT_CLAUSES,
    SCPN_FILES,
    SyntacticConfig,
    SyntacticTrigger,
    align_scpn,
    front_clause,
    match_scpn_style,
    scpn_paraphrases,
    scpn_poisoned_train,
    scpn_style,
    scpn_trigger,
    scpn_triggered_test,
)
from kdshield.attacks.targets import TARGETS, build_target, poison_sft, triggered_sft_test_set
from kdshield.attacks.triggers import (
    PROATTACK_CLEAN_TEMPLATE,
    PROATTACK_POISON_TEMPLATE,
    TRIGGERS,
    BadNetConfig,
    BadNetTrigger,
    InSentConfig,
    InSentTrigger,
    ProAttackConfig,
    ProAttackTrigger,
    Trigger,
    build_trigger,
    insert_tokens,
    trigger_names,
)

__all__ = [
    "DEFAULT_CLAUSES",
    "PROATTACK_CLEAN_TEMPLATE",
    "PROATTACK_POISON_TEMPLATE",
    "SCPN_FILES",
    "TARGETS",
    "TRIGGERS",
    "BadNetConfig",
    "BadNetTrigger",
    "InSentConfig",
    "InSentTrigger",
    "ProAttackConfig",
    "ProAttackTrigger",
    "SyntacticConfig",
    "SyntacticTrigger",
    "Trigger",
    "align_scpn",
    "match_scpn_style",
    "build_target",
    "build_trigger",
    "clean_test_set",
    "front_clause",
    "insert_tokens",
    "poison",
    "poison_budget",
    "poison_sft",
    "rare_words",
    "row_rng",
    "scpn_paraphrases",
    "scpn_poisoned_train",
    "scpn_style",
    "scpn_trigger",
    "scpn_triggered_test",
    "trigger_names",
    "triggered_sft_test_set",
    "triggered_test_set",
    "word_frequency",
    "word_rank",
]
