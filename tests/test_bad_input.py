"""Bad input fails before any work, with a message naming the problem and the fix, never a raw
traceback, and leaves an earlier run's directory byte for byte as it was.

One table, ``CASES``: each row builds its command line (and any files it needs) from an ``Env``
and says how the command must fail. To add a case, append a ``Case``:

    Case("finetune-yaml-typo-section",                       # test id
         lambda env: finetune(env, "--config", env.yaml("trian:\\n  epochs: 1\\n")),
         ["unknown section 'trian'", "did you mean 'train'"])  # substrings of the output

``code`` is the exit status of ``kdshield.cli.main`` (2: a KDShieldError), ``usage=True`` an
argparse usage error (SystemExit 2), ``marks`` pytest marks (an xfail for a fix still to come).
``env.run`` is an earlier run's directory (model/, adapter/, train/, results.jsonl; built once per
module without training, so it has no kdshield_run.json) that the commands' ``--out`` points at by
default; every file under it is hashed before and after each case. Cases whose check comes after
the command claims its output directory (model loading) pass ``*fresh_out(env)``; a resume or
checkpoint case that needs a real run manifest builds its own run in ``env.tmp``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kdshield.cli import main
from tests.conftest import make_sentiment_texts

# --- the finished run every case must leave alone ------------------------------------------------

def write_csv(path: Path, n: int = 120, names=("negative", "positive"), seed: int = 5) -> Path:
    texts, labels = make_sentiment_texts(n, seed=seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for t, y in zip(texts, labels):
            w.writerow([t, names[y]])
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory) -> dict:
    """An earlier run's directory as a finished finetune leaves it (no training: a fresh head is a
    valid classifier): model/ (kdshield classifier), adapter/ (LoRA adapter + head), results.jsonl."""
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier

    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    clf = load_classifier(tiny_llama_dir, label_names=["negative", "positive"])
    clf.max_length = 24
    clf.save(run / "model")
    attach_adapter(clf, AdapterConfig(r=2))
    clf.save(run / "adapter")
    (run / "results.jsonl").write_text(json.dumps({"run": "finetune", "method": "lora", "ca": 0.5}) + "\n")
    (run / "train").mkdir()
    (run / "train" / "state.json").write_text('{"step": 8, "finished": true}')
    return {"run": run, "csv": write_csv(root / "toy.csv")}


@dataclass
class Env:
    """What a case can build its command line from."""

    tmp: Path  # this case's own scratch folder
    run: Path  # the earlier run's directory (must stay byte-identical)
    csv: Path  # a small valid dataset (labels negative/positive)
    llama: Path  # tiny random Llama base model
    bert: Path  # tiny random BERT base model

    @property
    def model(self) -> Path:
        return self.run / "model"

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"

    @property
    def results(self) -> Path:
        return self.run / "results.jsonl"

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def yaml(self, text: str, name: str = "config.yaml") -> Path:
        return self.file(name, text)

    def grid(self, text: str = "") -> Path:
        """A small bench grid on the tiny model whose results and work dir are the earlier run's."""
        base = (f"students: [{self.llama}]\ndatasets: [{self.csv}]\nattacks: [badnet]\nmethods: [none]\n"
                "n_proxy: 32\nn_train: 32\nn_dev: 16\nn_test: 16\npoison_epochs: 1\nbatch_size: 8\n"
                f"floor: false\nwork_dir: {self.run / 'bench'}\nout: {self.results}\n")
        return self.file("grid.yaml", base + text)

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst


def truncate(path: Path) -> Path:
    os.truncate(path, path.stat().st_size // 2)
    return path


def scramble(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def damaged(env: Env, src: Path, rel: str, how=truncate) -> Path:
    """A copy of model directory ``src`` whose file ``rel`` is damaged by ``how``."""
    dst = env.copy(src, f"damaged-{src.name}")
    how(dst / rel)
    return dst


def with_auto_map(env: Env) -> Path:
    dst = env.copy(env.model, "remote-code-model")
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


FAST = ["--train.precision", "fp32", "--adapter.r", "2"]


def finetune(env: Env, *extra: str, data: Path | None = None) -> list[str]:
    return ["finetune", "--model", str(env.model), "--data", str(data or env.csv), "--out", str(env.run),
            *FAST, *extra]


def fresh_out(env: Env) -> list[str]:
    """For cases that fail after the output directory is claimed (loading the model): a new one."""
    return ["--out", str(env.tmp / "out")]


def defend(env: Env, *extra: str) -> list[str]:
    return ["defend", "--method", "w2s", "--student", str(env.model), "--data", str(env.csv), "--out",
            str(env.run), "--w2s.teacher", str(env.bert), *FAST, *extra]


def attack(env: Env, *extra: str, student: Path | None = None) -> list[str]:
    return ["attack", "--student", str(student or env.llama), "--data", str(env.csv), "--out", str(env.run),
            "--attack", "badnet", "--train.precision", "fp32", *extra]


def evaluate(env: Env, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    return ["evaluate", "--model", str(model or env.adapter), "--data", str(data or env.csv), *extra]


def bench(env: Env, grid: str = "", *extra: str) -> list[str]:
    return ["bench", str(env.grid(grid)), *extra]


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    messages: list[str]  # each must appear in stdout + stderr + log output
    code: int = 2
    usage: bool = False  # an argparse usage error: SystemExit(2) from the parser
    marks: list = field(default_factory=list)

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


CASES = [
    # 1. --config sections: a misspelled section is an error, never ignored
    Case("yaml-misspelled-section", lambda env: finetune(env, "--config", env.yaml("trian:\n  epochs: 1\n")),
         ["unknown section 'trian'", "did you mean 'train'", "valid sections for finetune", "adapter, attack"]),
    Case("yaml-misspelled-defense-section",
         lambda env: defend(env, "--config", env.yaml("w2z:\n  gamma: 0.1\n")),
         ["unknown section 'w2z'", "did you mean 'w2s'", "bedkd"]),
    Case("yaml-section-not-a-mapping", lambda env: finetune(env, "--config", env.yaml("train: 3\n")),
         ["section 'train' must be a mapping"]),
    Case("yaml-misspelled-option", lambda env: finetune(env, "--config", env.yaml("train:\n  epocs: 1\n")),
         ["unknown option 'epocs'", "did you mean 'epochs'"]),
    Case("evaluate-yaml-misspelled-section",
         lambda env: evaluate(env, "--config", env.yaml("atack:\n  attack: badnet\n")),
         ["unknown section 'atack'", "did you mean 'attack'"]),
    Case("yaml-malformed-file", lambda env: finetune(env, "--config", env.yaml("train:\n  epochs: [1\n")),
         ["is not valid YAML"]),
    Case("yaml-missing-file", lambda env: finetune(env, "--config", str(env.tmp / "nope.yaml")),
         ["nope.yaml does not exist"]),
    # 2. values of the wrong type, in YAML, on the command line and in bench grids
    Case("yaml-float-for-int", lambda env: finetune(env, "--config", env.yaml("train:\n  epochs: 1.5\n")),
         ["train.epochs=1.5", "is not an integer", "e.g. epochs: 2"]),
    Case("yaml-bool-for-int", lambda env: finetune(env, "--config", env.yaml("train:\n  epochs: true\n")),
         ["train.epochs=True (bool) is not an integer"]),
    Case("yaml-word-for-int", lambda env: finetune(env, "--config", env.yaml("data:\n  n_train: sixty-four\n")),
         ["n_train='sixty-four'", "is not an integer or null"]),
    Case("yaml-string-for-bool",
         lambda env: finetune(env, "--config", env.yaml("train:\n  select_best: maybe\n")),
         ["train.select_best='maybe'", "true or false"]),
    Case("yaml-list-for-float", lambda env: finetune(env, "--config", env.yaml("train:\n  lr: [0.1]\n")),
         ["train.lr=[0.1] (list) is not a number"]),
    Case("yaml-scalar-for-mapping", lambda env: finetune(env, "--config", env.yaml("data:\n  label_map: 3\n")),
         ["label_map=3 (int) is not a mapping"]),
    Case("yaml-defense-float-for-int",
         lambda env: defend(env, "--config", env.yaml("w2s:\n  teacher_epochs: 1.5\n")),
         ["w2s.teacher_epochs=1.5", "is not an integer"]),
    Case("cli-float-for-int", lambda env: finetune(env, "--train.epochs", "1.5"),
         ["--train.epochs: expected an integer, got '1.5'"], usage=True),
    Case("cli-word-for-int", lambda env: finetune(env, "--n-train", "sixty-four"),
         ["--n-train: expected an integer, got 'sixty-four'"], usage=True),
    Case("bench-scalar-for-list", lambda env: bench(env, "seeds: 1\n"),
         ["seeds=1 (int) is not a list of integers", "e.g. seeds: [0]"]),
    Case("bench-list-element", lambda env: bench(env, "seeds: [0, one]\n"),
         ["seeds[1]='one'", "is not an integer"]),
    Case("bench-float-for-int", lambda env: bench(env, "", "--set", "epochs=1.5"),
         ["epochs=1.5", "is not an integer"]),
    Case("bench-word-for-int", lambda env: bench(env, "", "--set", "n_train=sixty-four"),
         ["n_train='sixty-four'", "is not an integer or null"]),
    Case("bench-string-for-bool", lambda env: bench(env, "floor: maybe\n"),
         ["floor='maybe'", "true or false"]),
    Case("bench-list-for-mapping", lambda env: bench(env, "method_config: [w2s]\n"),
         ["method_config=['w2s'] (list) is not a mapping"]),
    Case("bench-misspelled-key", lambda env: bench(env, "epocs: 1\n"),
         ["unknown option 'epocs'", "did you mean 'epochs'"]),
    # 3. NaN and infinity pass no range check by comparison: rejected as non-finite
    Case("cli-nan", lambda env: finetune(env, "--train.lr", "nan"), ["train.lr=nan", "not a finite number"]),
    Case("yaml-inf", lambda env: finetune(env, "--config", env.yaml("train:\n  max_grad_norm: .inf\n")),
         ["train.max_grad_norm=inf", "not a finite number"]),
    Case("bench-nan", lambda env: bench(env, "", "--set", "lr=nan"), ["lr=nan", "not a finite number"]),
    # 4. malformed YAML in options parsed as YAML: a usage error, not a yaml traceback
    Case("cli-label-map-malformed", lambda env: finetune(env, "--label-map", "{a: 0"),
         ["argument --label-map", "'{a: 0' is not valid YAML"], usage=True),
    Case("cli-trigger-malformed", lambda env: finetune(env, "--attack", "badnet", "--trigger", "{words: [cf"),
         ["argument --trigger", "is not valid YAML"], usage=True),
    Case("cli-label-map-not-a-mapping", lambda env: finetune(env, "--label-map", "negative"),
         ["argument --label-map", "expected a mapping"], usage=True),
    Case("yaml-label-map-malformed-string",
         lambda env: finetune(env, "--config", env.yaml("data:\n  label_map: '{a: 0'\n")),
         ["label_map='{a: 0'", "not valid YAML"]),
    # 5. damaged weight files: named, and said to be damaged
    Case("model-safetensors-truncated",
         lambda env: evaluate(env, model=damaged(env, env.model, "model.safetensors")),
         ["model.safetensors is damaged", "truncated", "re-download"]),
    Case("model-safetensors-random-bytes",
         lambda env: evaluate(env, model=damaged(env, env.model, "model.safetensors", scramble)),
         ["model.safetensors is damaged", "re-run the kdshield step"]),
    Case("head-safetensors-random-bytes",
         lambda env: evaluate(env, model=damaged(env, env.model, "kdshield_head.safetensors", scramble)),
         ["kdshield_head.safetensors is damaged"]),
    Case("adapter-safetensors-truncated",
         lambda env: evaluate(env, model=damaged(env, env.adapter, "adapter/adapter_model.safetensors")),
         ["adapter_model.safetensors is damaged", "truncated"]),
    Case("adapter-head-truncated",
         lambda env: evaluate(env, model=damaged(env, env.adapter, "kdshield_head.safetensors")),
         ["kdshield_head.safetensors is damaged"]),
    Case("kdshield-json-truncated", lambda env: evaluate(env, model=damaged(env, env.adapter, "kdshield.json")),
         ["kdshield.json is damaged, not valid JSON"]),
    Case("finetune-base-model-damaged",
         lambda env: finetune(env, "--model", damaged(env, env.llama, "model.safetensors", scramble), *fresh_out(env)),
         ["model.safetensors is damaged"]),
    Case("attack-student-damaged",
         lambda env: attack(env, *fresh_out(env), student=damaged(env, env.llama, "model.safetensors")),
         ["model.safetensors is damaged", "truncated"]),
    # 6. remote code named in auto_map is ignored, and said so (the run itself goes on)
    Case("auto-map-warns", lambda env: evaluate(env, "--n-test", "8", model=with_auto_map(env)),
         ["auto_map", "ignored because trust_remote_code is off", "--trust-remote-code"], code=0),
    # 7. output paths that cannot be written: noticed before any work
    Case("evaluate-results-under-a-file", lambda env: evaluate(env, "--results", str(env.csv / "sub" / "r.jsonl")),
         ["cannot create the directory", "under an existing file"]),
    Case("evaluate-results-folder-is-a-file", lambda env: evaluate(env, "--results", str(env.csv / "r.jsonl")),
         ["is an existing file, not a directory"]),
    Case("evaluate-results-is-a-directory", lambda env: evaluate(env, "--results", str(env.run)),
         ["is a directory; pass a JSONL file path"]),
    Case("finetune-out-is-a-file", lambda env: finetune(env, "--out", env.csv), ["is an existing file"]),
    Case("attack-out-under-a-file", lambda env: attack(env, "--out", env.csv / "sub"),
         ["cannot create the directory"]),
    Case("defend-out-is-a-file", lambda env: defend(env, "--out", env.csv), ["is an existing file"]),
    Case("bench-out-under-a-file", lambda env: bench(env, "", "--out", str(env.csv / "r.jsonl")),
         ["is an existing file"]),
    Case("bench-set-malformed-yaml", lambda env: bench(env, "", "--set", "seeds=[0"),
         ["--set", "is not valid YAML"]),
    Case("bench-method-config-unknown-option", lambda env: bench(env, "method_config: {lora: {rr: 1}}\n"),
         ["unknown option 'rr'"]),
    # 8. evaluate: the data's labels must be the model's classes, in its order
    Case("evaluate-label-map-permutes-classes",
         lambda env: evaluate(env, "--label-map", "{positive: 0, negative: 1}"),
         ["['positive', 'negative'] are the classes of", "['negative', 'positive'] in another order",
          '--label-map "{negative: 0, positive: 1}"']),
    Case("evaluate-other-label-names",
         lambda env: evaluate(env, data=write_csv(env.tmp / "other.csv", names=("bad", "good"))),
         ["['bad', 'good'] are not the classes", "['negative', 'positive']", "--ignore-label-names"]),
    Case("evaluate-max-length-0", lambda env: evaluate(env, "--max-length", "0"),
         ["--max-length=0 is out of range"]),
    Case("evaluate-batch-size-0", lambda env: evaluate(env, "--batch-size", "0"),
         ["--batch-size=0 is out of range"]),
    Case("evaluate-unknown-split", lambda env: evaluate(env, "--split", "validation"),
         ["has no split 'validation'", "available:"]),
    # 9. more of the same family
    Case("train-batch-size-0", lambda env: finetune(env, "--train.batch-size", "0"),
         ["train.batch_size=0 is out of range"]),
    Case("target-label-not-a-class", lambda env: finetune(env, "--attack", "badnet", "--target-label", "5"),
         ["target_label=5 is not a class", "0 = negative, 1 = positive"]),
    Case("trigger-unknown-option", lambda env: finetune(env, "--attack", "badnet", "--trigger", "{wrds: [cf]}"),
         ["unknown option 'wrds'", "did you mean 'words'"]),
    Case("trigger-option-type", lambda env: finetune(env, "--attack", "badnet", "--trigger", "{count: 1.5}"),
         ["trigger.count=1.5", "is not an integer"]),
    Case("unknown-attack", lambda env: finetune(env, "--attack", "badnt"),
         ["attack='badnt' is not one of"]),
    Case("data-no-text-column",
         lambda env: finetune(env, data=env.file("body.csv", env.csv.read_text().replace("text,", "body,", 1))),
         ["no text column found", "--text-column"]),
    Case("data-no-label-column",
         lambda env: finetune(env, data=env.file("stars.csv", env.csv.read_text().replace(",label", ",stars", 1))),
         ["no label column found", "--label-column"]),
    Case("data-one-class",
         lambda env: finetune(env, data=write_csv(env.tmp / "one.csv", names=("positive", "positive"))),
         ["every row has label 'positive'", "at least 2 classes"]),
    Case("data-empty-file", lambda env: finetune(env, data=env.file("empty.csv", "text,label\n")),
         ["has no rows"]),
    Case("data-missing-file", lambda env: finetune(env, data=env.tmp / "missing.csv"),
         ["missing.csv: no such file"]),
    Case("model-missing", lambda env: finetune(env, "--model", env.tmp / "nope", *fresh_out(env)),
         ["does not exist"]),
]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_fails_early_and_clearly(case: Case, finished_run, tiny_llama_dir, tiny_bert_dir, tmp_path,
                                           capsys, caplog):
    env = Env(tmp=tmp_path, run=finished_run["run"], csv=finished_run["csv"], llama=tiny_llama_dir,
              bert=tiny_bert_dir)
    argv = [str(a) for a in case.argv(env)]
    before = tree_digest(env.run)
    caplog.set_level(logging.INFO)
    if case.usage:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        code = exc.value.code
    else:
        code = main(argv)
    captured = capsys.readouterr()
    output = captured.out + captured.err + caplog.text
    assert code == case.code, output[-3000:]
    for message in case.messages:
        assert message in output, f"{message!r} not in:\n{output[-3000:]}"
    if case.code != 0:
        assert "kdshield" in captured.err and "error:" in captured.err
    assert "Traceback" not in output
    assert tree_digest(env.run) == before, "the earlier run's directory changed"


# --- pieces the table relies on --------------------------------------------------------------------

def test_auto_map_warning_once_per_load(finished_run, tmp_path, caplog):
    from kdshield.models.classifier import load_classifier
    from kdshield.models.loading import LoadOptions, warn_ignored_remote_code

    model = tmp_path / "m"
    shutil.copytree(finished_run["run"] / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    caplog.set_level(logging.WARNING, logger="kdshield")
    load_classifier(model)
    assert caplog.text.count("ships its own model code") == 1 and "x.Y" in caplog.text
    caplog.clear()
    load_classifier(finished_run["run"] / "model")  # no auto_map: no warning
    warn_ignored_remote_code(model, LoadOptions(trust_remote_code=True))  # opted in: the code runs, no warning
    assert "auto_map" not in caplog.text


def test_max_length_is_saved_and_evaluate_defaults_to_it(finished_run, tmp_path, monkeypatch, capsys, caplog):
    import kdshield.cli.evaluate as ev
    from kdshield.models.classifier import load_classifier

    run = finished_run["run"]
    assert load_classifier(run / "model").max_length == 24
    assert load_classifier(run / "adapter").max_length == 24
    seen = []

    def fake_evaluate(clf, task, attack, **kw):
        seen.append(kw["max_length"])
        return {"ca": 0.5, "n_ca": 1}

    monkeypatch.setattr(ev, "evaluate_model", fake_evaluate)
    common = ["--data", str(finished_run["csv"])]
    assert main(["evaluate", "--model", str(run / "adapter"), *common]) == 0
    assert main(["evaluate", "--model", str(run / "adapter"), "--max-length", "40", *common]) == 0
    old = tmp_path / "old"  # a model saved before max_length was recorded
    shutil.copytree(run / "model", old)
    meta = json.loads((old / "kdshield.json").read_text())
    meta.pop("max_length")
    (old / "kdshield.json").write_text(json.dumps(meta))
    caplog.set_level(logging.INFO)
    assert main(["evaluate", "--model", str(old), *common]) == 0
    assert seen == [24, 40, 64]
    assert "records no training max_length; using 64" in caplog.text


def test_check_output_dir(tmp_path):
    from kdshield.cli.common import check_output_dir
    from kdshield.errors import ConfigError

    new = check_output_dir(tmp_path / "a" / "b")
    assert new.is_dir() and list(new.iterdir()) == []  # created; the write probe is gone
    (new / "keep.txt").write_text("x")
    assert check_output_dir(new) == new and [p.name for p in new.iterdir()] == ["keep.txt"]
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_output_dir(file)
    with pytest.raises(ConfigError, match="cannot create the directory"):
        check_output_dir(file / "sub")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            check_output_dir(locked)


def test_check_range_rejects_non_finite():
    from kdshield.config import check_range
    from kdshield.errors import ConfigError

    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match="not a finite number"):
            check_range("train.lr", bad, 0, 1)
        with pytest.raises(ConfigError, match="not a finite number"):
            check_range("x", bad)  # no bounds at all
    with pytest.raises(ConfigError, match="not a number"):
        check_range("x", "3", 0, 5)
    check_range("x", 3, 0, 5)
    check_range("x", 0.5, 0, 1, lo_open=True)


def test_safetensors_check_accepts_what_safetensors_writes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kdshield.errors import ModelLoadError
    from kdshield.models.loading import check_safetensors_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.int64), "e": torch.zeros(0)}, str(path),
              metadata={"format": "pt"})
    check_safetensors_file(path)
    data = path.read_bytes()
    for bad in (data[:-1], data + b"\0", data[:5], b""):
        path.write_bytes(bad)
        with pytest.raises(ModelLoadError, match="is damaged"):
            check_safetensors_file(path)
