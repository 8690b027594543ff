"""Datasets for kdshield: builtin assets, the papers' datasets, local files, benchmark splits.

    kdshield data show rotten-tomatoes
    kdshield data show sst2 --proxy imdb --data-dir ../shared/data

    from kdshield.data import load_task
    task = load_task("sst2", proxy="imdb", data_dir="../shared/data")
    task.split("train")        # datasets.Dataset with "text" (str) and "label" (int)

``load_source`` returns a dataset's splits as they come; ``load_task`` returns the benchmark
layout proxy/train/dev/test (see ``kdshield.data.load``); ``load_sft`` the same layout of
instruction / input / output rows for generative tasks (``kdshield.data.sft``). Paper datasets come from a data dir
(``--data-dir`` or ``$KDSHIELD_DATA_DIR``) or, without one, the Hugging Face hub.
"""

from kdshield.data.builtin import BUILTIN_NAMES
from kdshield.data.core import TaskData, normalize_text, truncate_text
from kdshield.data.load import KNOWN_NAMES, DataConfig, load_source, load_task
from kdshield.data.paper import (
    DATA_DIR_ENV,
    PAPER_NAMES,
    paper_file_exists,
    read_paper_file,
    resolve_data_dir,
)
from kdshield.data.sft import SFT_BUILTINS, SFTData, load_sft, load_sft_source
from kdshield.data.splits import FRACTIONS, LAYOUT

__all__ = [
    "BUILTIN_NAMES",
    "DATA_DIR_ENV",
    "FRACTIONS",
    "KNOWN_NAMES",
    "LAYOUT",
    "PAPER_NAMES",
    "SFT_BUILTINS",
    "SFTData",
    "DataConfig",
    "TaskData",
    "load_sft",
    "load_sft_source",
    "load_source",
    "load_task",
    "normalize_text",
    "paper_file_exists",
    "read_paper_file",
    "resolve_data_dir",
    "truncate_text",
]
