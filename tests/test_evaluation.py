"""Metrics: CA, ASR over non-target samples only, FAR/FRR, removal ratio; results records."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kdshield.results
from kdshield.errors import DataError
from kdshield.evaluation import accuracy, attack_success_rate, far_frr, far_frr_curve, removal_ratio
from kdshield.results import append_record, git_hash, make_record, read_records

SRC = Path(kdshield.results.__file__).resolve().parent


def test_asr_counts_only_non_target_samples():
    preds = np.array([0, 0, 1, 0])
    true = np.array([0, 1, 1, 1])  # the first sample is a target-label sample: ignored
    assert attack_success_rate(preds, true, target_label=0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not the target"):
        attack_success_rate(np.array([0, 0]), np.array([0, 0]), 0)


def test_accuracy_from_probs():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probs, [0, 1, 1]) == pytest.approx(2 / 3)


def test_far_frr_and_curve():
    far, frr = far_frr([True, False, True, False], [True, True, False, False])
    assert far == 0.5 and frr == 0.5
    assert far_frr([True], [True]) == (None, 0.0)
    rows = far_frr_curve([0.05, 0.2, 0.5], [True, True, False], [0.1, 0.3])
    assert rows[0] == {"threshold": 0.1, "far": 0.0, "frr": 0.5}
    assert rows[1] == {"threshold": 0.3, "far": 0.0, "frr": 0.0}


def test_removal_ratio():
    assert removal_ratio(0.95, 0.18, 0.18) == pytest.approx(1.0)
    assert removal_ratio(0.95, 0.95, 0.18) == pytest.approx(0.0)
    assert removal_ratio(0.2, 0.1, 0.2) is None


def test_records_roundtrip_and_truncated_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = make_record("defend", "w2s", dataset="toy", ca=0.8, asr=0.2, seed=0)
    assert rec["git"] == git_hash()
    assert {"config", "versions", "time", "peak_rss_mb"} <= set(rec)
    append_record(path, rec)
    append_record(path, make_record("defend", "lora", ca=0.9, asr=0.9))
    with path.open("a") as fh:
        fh.write('{"run": "def')  # a writer killed mid-line
    assert [r["method"] for r in read_records(path)] == ["w2s", "lora"]
    with path.open("a") as fh:
        fh.write('\n{"ok": 1}\n')
    with pytest.raises(DataError, match=":3:"):
        read_records(path)
    with pytest.raises(ValueError, match="fraction"):
        make_record("x", "y", ca=1.5)
    assert json.loads(path.read_text().splitlines()[0])["method"] == "w2s"


def _git(*args, cwd=SRC) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_git_hash_is_the_checkout_head():
    """In a git checkout (this one): the short hash of HEAD, with -dirty when tracked files changed."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout, or no git (the next test covers that case)")
    git_hash.cache_clear()
    got = git_hash()
    git_hash.cache_clear()
    assert isinstance(got, str), got
    if got.removesuffix("-dirty") != head:  # someone committed in between: ask once more
        head = _git("rev-parse", "--short", "HEAD")
    assert got.removesuffix("-dirty") == head
    assert make_record("defend", "w2s")["git"] == got


def test_git_hash_clean_dirty_and_unavailable(tmp_path, monkeypatch):
    """``-dirty`` exactly when a tracked file differs from HEAD (untracked files do not count); None
    outside a repository and without git."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    module = repo / "pkg" / "results.py"
    module.write_text("x = 1\n")
    if shutil.which("git") is None:
        monkeypatch.setattr(kdshield.results, "__file__", str(module))
        git_hash.cache_clear()
        assert git_hash() is None
        git_hash.cache_clear()
        return
    _git("init", "-q", cwd=repo)
    _git("add", "pkg/results.py", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one", cwd=repo)
    head = _git("rev-parse", "--short", "HEAD", cwd=repo)
    monkeypatch.setattr(kdshield.results, "__file__", str(module))

    def fresh():
        git_hash.cache_clear()
        return git_hash()

    try:
        assert fresh() == head
        (repo / "pkg" / "new.txt").write_text("untracked")
        assert fresh() == head
        module.write_text("x = 2\n")
        assert fresh() == f"{head}-dirty"
        outside = tmp_path / "outside" / "results.py"
        outside.parent.mkdir()
        monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
        monkeypatch.setattr(kdshield.results, "__file__", str(outside))
        assert fresh() is None  # not a repository
        monkeypatch.setattr(kdshield.results, "__file__", str(module))
        monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
        assert fresh() is None  # no git executable
    finally:
        git_hash.cache_clear()


def test_peak_rss_window_resets_on_linux():
    from kdshield.evaluation import peak_rss_mb, reset_peak_rss

    block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, touched
    high = peak_rss_mb()
    del block
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak-memory mark; peak_rss_mb is the process peak")
    assert peak_rss_mb() < high - 150  # the 200 MB block belongs to the previous window
    block = np.ones(100 * 2**20, dtype=np.uint8)
    assert peak_rss_mb() >= 100
    del block
