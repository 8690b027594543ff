"""Is the W2SDefense teacher fit to teach? The teacher and the suspect side by side on the clean dev
split, before the student trains: the response NLL of each and, on label tasks, how often each would
answer exactly right (teacher-forced argmax of every response token, EOS included), next to the
share of the most common answer (what a model that always says the same thing gets).

Why this exists: on rotten-tomatoes-instruct (clean-label BadNet -> "negative") the default teacher,
SmolLM2 cut to 12 of its 30 layers and fully SFT-ed, came out near chance on the sentiment (dev NLL
0.32 nats per token over answer + EOS, i.e. about ln 2 on the answer). The student, pulled towards
that teacher's flat answers by KD and feature alignment, ended at the decision boundary: on positive
dev rows its mean answer margin nll(positive) - nll(negative) was -0.41 nats (the suspect's -1.34),
and the trigger's shift of that margin fell from +4.7 to +1.2 nats, a quarter, yet still flipped
every triggered answer (test ASR 1.0). A user cannot measure ASR; this check reads clean dev data
only and says before the student's hour of training that the teacher answers much worse than the
model it is meant to guide. It warns and records; with ``weak_teacher: deepen`` the defense then
trains the whole teacher instead (``w2s_generation.gen_w2s_defend``).
"""

from __future__ import annotations

import logging
from collections import Counter

from kdshield.data.sft import normalize_answer
from kdshield.errors import DataError

log = logging.getLogger(__name__)

# a teacher this much less often exactly right than the suspect on clean dev rows is called weak,
# and so is one within this margin of always giving the most common answer (label tasks only)
ACCURACY_GAP = 0.10
MAJORITY_MARGIN = 0.05


def _dev_scores(gen, dev, *, max_length: int, max_response_tokens: int | None, batch_size: int) -> dict:
    from kdshield.generation.decode import teacher_forced

    tf = teacher_forced(gen, dev, max_length=max_length, max_response_tokens=max_response_tokens,
                        batch_size=batch_size)
    exact = tf["argmax_match_eos"]
    return {"nll": float(tf["nll"]), "exact": sum(bool(x) for x in exact) / len(exact)}


def majority_share(outputs) -> float:
    """Share of the most common (normalised) answer among ``outputs``."""
    counts = Counter(normalize_answer(o) for o in outputs)
    if not counts:
        raise DataError("majority_share got no answers")
    return max(counts.values()) / sum(counts.values())


def teacher_check(teacher, suspect, dev, *, label_task: bool, max_length: int,
                  max_response_tokens: int | None = None, batch_size: int = 16) -> dict:
    """The teacher against the suspect on the clean ``dev`` rows (both generators read their own
    tokenizer): ``teacher_nll`` / ``suspect_nll`` (token mean, nats) always; on label tasks also
    ``teacher_exact`` / ``suspect_exact`` / ``majority`` and ``weak`` (see ``ACCURACY_GAP``)."""
    if dev is None or not len(dev):
        raise DataError("teacher_check needs clean dev rows")
    kw = dict(max_length=max_length, max_response_tokens=max_response_tokens, batch_size=batch_size)
    t, s = _dev_scores(teacher, dev, **kw), _dev_scores(suspect, dev, **kw)
    out = {"rows": len(dev), "teacher_nll": round(t["nll"], 4), "suspect_nll": round(s["nll"], 4)}
    if label_task:
        majority = majority_share(dev["output"])
        bar = max(majority + MAJORITY_MARGIN, s["exact"] - ACCURACY_GAP)
        out.update(teacher_exact=round(t["exact"], 4), suspect_exact=round(s["exact"], 4),
                   majority=round(majority, 4), weak=t["exact"] < bar)
    return out


def teacher_warning(check: dict) -> str | None:
    """A sentence for the user when ``check`` calls the teacher weak, else None."""
    if not check.get("weak"):
        return None
    return (f"the W2SDefense teacher answers the clean dev prompts exactly right {check['teacher_exact']:.0%} of "
            f"the time, against {check['suspect_exact']:.0%} for the suspect and {check['majority']:.0%} for "
            f"always giving the most common answer (dev NLL {check['teacher_nll']:.3f} vs "
            f"{check['suspect_nll']:.3f}): distilling from it flattens the student's answers, and a backdoor "
            "that only moves the answer a little then still decides it. Give a stronger clean teacher "
            "(w2s.weak_teacher: deepen trains the whole teacher when this check fails; w2s.teacher_layers: null "
            "keeps every layer; w2s.teacher_epochs / teacher_lr train it longer) "
            "and compare this check again before trusting the defense")
