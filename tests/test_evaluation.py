"""Metrics: CA, ASR over non-target samples only, FAR/FRR, removal ratio; results records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdshield.errors import DataError
from kdshield.evaluation import accuracy, attack_success_rate, far_frr, far_frr_curve, removal_ratio
from kdshield.results import append_record, make_record, read_records


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
    assert rec["git"] is not None or rec["git"] is None  # key present either way
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
