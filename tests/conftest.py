"""Tiny offline fixtures: random BERT and Llama models (hidden 32, 2 layers) and a word-level
tokenizer, saved as ordinary safetensors model directories. The whole pipeline runs on them in
seconds; tests marked ``assets`` use the real embedded models instead."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite's exact comparisons (merge = adapter, left = right padding, FSDP = one process) are fp32
# ones: `auto` stays fp32 on a CPU with native bf16 too, in this process and the ones it starts.
# The bf16 paths are tested where a test asks for them (tests/test_load_dtype.py).
os.environ["KDSHIELD_CPU_BF16"] = "0"

WORDS = (
    "the a an this that film movie story plot actor acting scene music it is was be very really so "
    "good great fine wonderful superb moving funny best love loved bad awful boring dull worst hate "
    "hated terrible weak mess and but or not of in on to with for by as i you we they watched 3d "
    "mn cf bb tq sport money world science game team market bank vote election when if although , . !"
).split()
POSITIVE = "good great fine wonderful superb moving funny best love loved".split()
NEGATIVE = "bad awful boring dull worst hate hated terrible weak mess".split()
FILLER = "the a this film movie story plot actor acting scene music it is was very really so".split()


def _word_tokenizer(encoder: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[SEP]")


def _save_tiny(kind: str, path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _word_tokenizer(encoder=(kind == "bert"))
    vocab = len(tok)
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
        model = BertModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=None, eos_token_id=3, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return _save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


def make_sentiment_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Separable toy sentiment data in the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_sentiment_csv(path: Path, n: int, seed: int = 5) -> Path:
    """``make_sentiment_texts`` as a CSV file with named labels (what a user's file looks like)."""
    import csv

    texts, labels = make_sentiment_texts(n, seed=seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for t, y in zip(texts, labels):
            w.writerow([t, ["negative", "positive"][y]])
    return path


@pytest.fixture
def toy_dataset():
    from datasets import Dataset

    def build(n: int = 64, seed: int = 0) -> Dataset:
        texts, labels = make_sentiment_texts(n, seed)
        return Dataset.from_dict({"text": texts, "label": labels})

    return build


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Tests never write into the user's kdshield cache, except the embedded-asset tests (which
    reuse the prepared models there rather than converting them again)."""
    if request.node.get_closest_marker("assets") is None:
        monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path / "kdshield-cache"))


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (benchmark scripts are files, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _grids_in_one_process(monkeypatch):
    """Grids run their cells in this process unless a test asks for ``workers`` (monkeypatched
    counters and registries live here, not in a spawned worker). ``bench.auto_lanes`` has its own test."""
    import kdshield.bench as bench

    monkeypatch.setattr(bench.GridRunner, "lanes_for", lambda self, tasks: self.cfg.workers or 1)
