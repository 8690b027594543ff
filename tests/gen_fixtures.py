"""Toy SFT rows in the vocabulary of conftest's tiny Llama (word-level, no chat template), and
helpers shared by the generative model and training tests.

The response is a function of the input (a sentiment word in the input decides "it is good ." or
"it is bad ."), so SFT has something to learn; prompts and responses differ in length per row, so
batches need padding.
"""

from __future__ import annotations

import random

from tests.conftest import FILLER, NEGATIVE, POSITIVE


def make_sft_rows(n: int, seed: int = 0) -> dict[str, list]:
    """``n`` SFT rows as columns (id, system, history, instruction, input, output)."""
    rng = random.Random(seed)
    cols: dict[str, list] = {k: [] for k in ("id", "system", "history", "instruction", "input", "output")}
    for i in range(n):
        positive = i % 2 == 1
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
        tail = ["very", "really"][: rng.randint(0, 2)]
        cols["id"].append(f"toy/{i}")
        cols["system"].append("")
        cols["history"].append([])
        cols["instruction"].append("the story")
        cols["input"].append(" ".join(words))
        cols["output"].append(" ".join(["it", "is", *tail, "good" if positive else "bad", "."]))
    return cols


def sft_rows(n: int, seed: int = 0):
    from kdshield.data.sft import sft_dataset

    return sft_dataset(make_sft_rows(n, seed))


def sft_data(n_train: int = 32, n_dev: int = 8, seed: int = 0):
    """An SFTData with train/dev/test splits of toy rows (disjoint seeds)."""
    from kdshield.data.sft import SFTData

    return SFTData(name="toy-sft", splits={"train": sft_rows(n_train, seed), "dev": sft_rows(n_dev, seed + 100),
                                           "test": sft_rows(n_dev, seed + 200)}, source="tests")


def label_sft_data(n_train: int = 32, n_dev: int = 16):
    """A label task (``label_words`` bad / good) of toy rows whose answer is the one word the
    sentiment word in the input decides: train and dev splits."""
    from kdshield.data.sft import SFTData, sft_dataset

    def rows(n, seed):
        cols = make_sft_rows(n, seed)
        cols["output"] = ["good" if o.split()[-2] == "good" else "bad" for o in cols["output"]]
        cols["label"] = [int(o == "good") for o in cols["output"]]
        return sft_dataset(cols)

    return SFTData(name="toy-label", splits={"train": rows(n_train, 0), "dev": rows(n_dev, 100)},
                   source="tests", label_words=["bad", "good"])
