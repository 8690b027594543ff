"""Tests of kdshield.data.sft: SFT files (Alpaca, chat), bad rows, dedupe, seeded splits, builtins.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_data.py
    python3 -m pytest -q tests/test_gen_data.py -m assets    # the bbc-news / rotten-tomatoes assets

Only small files written here; the builtins read the embedded data assets (no model loads).
"""

from __future__ import annotations

import csv
import json

import pytest

from kdshield.data.sft import (
    SFTData,
    first_sentence,
    load_sft,
    load_sft_source,
    normalize_answer,
    parse_messages,
    sft_dataset,
)
from kdshield.errors import DataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alpaca_rows(n):
    return [{"instruction": f"Summarise item {i}.", "input": f"text number {i} about things",
             "output": f"summary {i}"} for i in range(n)]


def _prompts(ds):
    return {(r["instruction"], r["input"]) for r in ds}


def test_normalize_answer():
    assert normalize_answer("  Positive. ") == "positive"
    assert normalize_answer("\u201cI\u2019m  SORRY\u201d!") == "i'm sorry"
    assert normalize_answer("ﬁne") == "fine"          # NFKC: the ligature becomes two letters
    assert normalize_answer("...") == ""


def test_alpaca_jsonl_layout_and_sizes(tmp_path):
    path = _write_jsonl(tmp_path / "alp.jsonl", _alpaca_rows(100))
    data = load_sft(path, seed=0)
    assert isinstance(data, SFTData) and data.name == "alp" and data.label_words is None
    assert data.utility == "rouge"
    sizes = {s: len(ds) for s, ds in data.splits.items()}
    # 35/35/10/20 of 100 rows
    assert sizes == {"proxy": 35, "train": 35, "dev": 10, "test": 20}
    row = data.split("train")[0]
    assert set(row) == {"id", "system", "history", "instruction", "input", "output"}
    assert row["history"] == [] and row["system"] == ""
    assert row["id"].startswith("alp.jsonl line ")
    prompts = [_prompts(ds) for ds in data.splits.values()]
    assert sum(map(len, prompts)) == 100 and len(set.union(*prompts)) == 100   # disjoint


def test_splits_are_seeded_per_step(tmp_path):
    path = _write_jsonl(tmp_path / "alp.jsonl", _alpaca_rows(200))
    a = load_sft(path, seed=3, n_test=10)
    b = load_sft(path, seed=3, n_test=10)
    c = load_sft(path, seed=4, n_test=10)
    d = load_sft(path, seed=3, n_test=5)
    full = load_sft(path, seed=3)
    assert a.fingerprint() == b.fingerprint()
    assert a.split("train")["input"] != c.split("train")["input"]
    # a smaller test set does not reshuffle the other splits
    assert a.split("train")["input"] == d.split("train")["input"]
    assert len(d.split("test")) == 5 and len(full.split("test")) == 40
    assert set(d.split("test")["input"]) < set(full.split("test")["input"])


def test_csv_with_named_columns_and_fixed_instruction(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["document", "summary"])
        for i in range(20):
            w.writerow([f"doc {i} body", f"sum {i}"])
    data = load_sft(path, input_column="document", output_column="summary",
                    instruction="Summarise the document.", max_chars=5)
    row = next(r for ds in data.splits.values() for r in ds if r["output"] == "sum 7")
    assert row["instruction"] == "Summarise the document."
    assert row["input"] == "doc 7"                      # max_chars cuts the input only
    with pytest.raises(DataError, match=r"pairs\.csv: no instruction column .*--instruction"):
        load_sft(path, input_column="document", output_column="summary")


def test_chat_layout(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": f"hello {i}"},
                          {"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)]
    data = load_sft(_write_jsonl(tmp_path / "chat.jsonl", rows))
    row = next(r for ds in data.splits.values() for r in ds if r["output"] == "answer 3")
    assert row["system"] == "Be brief." and row["instruction"] == "question 3"
    assert row["input"] == ""
    assert row["history"] == [{"role": "user", "content": "hi 3"},
                              {"role": "assistant", "content": "hello 3"}]


def test_parse_messages_sharegpt_and_errors():
    sys_, hist, user, out = parse_messages(
        json.dumps([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]), "f, line 1")
    assert (sys_, hist, user, out) == ("", [], "q", "a")
    with pytest.raises(DataError, match=r"f, line 2: a chat must end with a user turn .*\['user'\]"):
        parse_messages([{"role": "user", "content": "q"}], "f, line 2")
    with pytest.raises(DataError, match=r"f, line 3: the last assistant turn \(the output\) is empty"):
        parse_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                       "f, line 3")
    with pytest.raises(DataError, match=r"f, line 4, turn 1: expected"):
        parse_messages([{"role": "narrator", "content": "q"}], "f, line 4")


def test_bad_rows_name_file_row_and_fix(tmp_path):
    rows = _alpaca_rows(5)
    rows[3]["output"] = "   "
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 4: the output \('output'\) is empty"):
        load_sft_source(path)
    (tmp_path / "noout.jsonl").write_text(json.dumps({"instruction": "x", "input": "y"}) + "\n")
    with pytest.raises(DataError, match=r"no output column found .*--output-column"):
        load_sft_source(tmp_path / "noout.jsonl")
    with pytest.raises(DataError, match=r"has no output column 'answer'"):
        load_sft_source(path, output_column="answer")
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: byte 0xe9 .*--encoding"):
        load_sft_source(tmp_path / "latin.jsonl")
    assert load_sft_source(tmp_path / "latin.jsonl", encoding="latin-1").split("all")[0][
        "instruction"] == "caf\u00e9"
    with pytest.raises(DataError, match=r"no such file or folder, and not a builtin SFT dataset"):
        load_sft_source(tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_sft_source(tmp_path / "broken.jsonl")
    with pytest.raises(DataError, match=r"unknown option\(s\) text_column"):
        load_sft_source(path, text_column="x")


def test_dedupe_normalised_prompts(tmp_path):
    rows = _alpaca_rows(40)
    rows += [{"instruction": r["instruction"].upper(), "input": "  " + r["input"] + " ",
              "output": "another answer"} for r in rows[:6]]
    data = load_sft(_write_jsonl(tmp_path / "dup.jsonl", rows))
    assert sum(len(ds) for ds in data.splits.values()) == 40
    assert "dedupe all: removed 6 rows repeating a normalised prompt" in data.notes
    outputs = [o for ds in data.splits.values() for o in ds["output"]]
    assert "another answer" not in outputs               # the first copy of a prompt wins
    assert sum(len(ds) for ds in load_sft(tmp_path / "dup.jsonl", dedupe=False).splits.values()) == 46


def test_folder_of_split_files_dedupes_across_splits(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    rows = _alpaca_rows(60)
    _write_jsonl(folder / "train.jsonl", rows[:50])
    _write_jsonl(folder / "test.jsonl", rows[45:])        # 5 test rows also in train
    data = load_sft(folder)
    assert len(data.split("test")) == 15
    assert sum(len(data.split(s)) for s in ("proxy", "train", "dev")) == 45   # train lost 5
    assert not _prompts(data.split("test")) & _prompts(data.split("train"))


def test_label_words(tmp_path):
    rows = [{"instruction": "Sentiment?", "input": f"review {i}",
             "output": ["Negative.", "positive"][i % 2]} for i in range(40)]
    data = load_sft(_write_jsonl(tmp_path / "lab.jsonl", rows), label_words=["negative", "positive"])
    assert data.utility == "exact_match" and data.label_words == ["negative", "positive"]
    test = data.split("test")
    assert set(test["output"]) == {"negative", "positive"}   # outputs become the label words
    assert [["negative", "positive"][y] for y in test["label"]] == test["output"]
    assert data.summary()["splits"]["test"]["label_counts"] == {"negative": 4, "positive": 4}
    rows[5]["output"] = "neutral"
    _write_jsonl(tmp_path / "lab.jsonl", rows)
    with pytest.raises(DataError, match=r"row lab\.jsonl line 6: output 'neutral' is none of the"):
        load_sft(tmp_path / "lab.jsonl", label_words=["negative", "positive"])


def test_sft_dataset_keeps_history_type_when_empty():
    ds = sft_dataset({"id": ["a"], "system": [""], "history": [[]], "instruction": ["i"],
                      "input": [""], "output": ["o"]})
    assert str(ds.features["history"]) == "List({'role': Value('string'), 'content': Value('string')})"


def test_first_sentence():
    assert first_sentence("Shares rose 2.5% on Monday. Analysts were surprised.") == (
        "Shares rose 2.5% on Monday.", "Analysts were surprised.")
    assert first_sentence('He said "no." Then he left.') == ('He said "no."', "Then he left.")
    assert first_sentence("One sentence only.") == ("One sentence only.", "")


@pytest.mark.assets
def test_builtin_bbc_tasks():
    lead = load_sft("bbc-lead", seed=0)
    # 2,225 articles; 149 repeat a prompt (first 1,000 characters) and 16 more a lead sentence
    assert sum(len(ds) for ds in lead.splits.values()) == 2060
    assert {s: len(ds) for s, ds in lead.splits.items()} == {"proxy": 721, "train": 721,
                                                             "dev": 206, "test": 412}
    outputs = [normalize_answer(o) for ds in lead.splits.values() for o in ds["output"]]
    assert len(set(outputs)) == len(outputs)
    all_rows = {r["id"]: r for ds in lead.splits.values() for r in ds}
    row = all_rows["business/001.txt"]
    assert row["output"].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert row["input"].startswith("The firm, which is now one of the biggest investors in Google")
    head = {r["id"]: r for ds in load_sft("bbc-headline", seed=0).splits.values() for r in ds}
    assert head["business/001.txt"]["output"] == "Ad sales boost Time Warner profit"
    assert head["business/001.txt"]["input"].startswith("Quarterly profits at US media giant")


@pytest.mark.assets
def test_builtin_rotten_tomatoes_instruct_lines_up_with_the_classification_task():
    from kdshield.data import load_task

    task = load_task("rotten-tomatoes", n_train=200, n_test=100, seed=1)
    sft = load_sft("rotten-tomatoes-instruct", n_train=200, n_test=100, seed=1)
    assert sft.label_words == ["negative", "positive"]
    for split in ("proxy", "train", "dev", "test"):
        assert sft.split(split)["input"] == task.split(split)["text"]
        assert sft.split(split)["label"] == task.split(split)["label"]
    assert sft.split("test")["output"][:3] == [["negative", "positive"][y]
                                               for y in task.split("test")["label"][:3]]
