"""build_config checks every value against its field's type hint (YAML, command line, keyword
overrides) and names the field, the value, the expected type and an example when it does not fit."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdshield.config import add_config_arguments, build_config, cfg_field, check_field_value
from kdshield.errors import ConfigError


@dataclass
class Demo:
    count: int = cfg_field(3, help="an int")
    rate: float = cfg_field(0.5, help="a float")
    flag: bool = cfg_field(True, help="a bool")
    name: str = cfg_field("x", help="a str")
    size: int | None = cfg_field(None, help="an optional int")
    ratio: float | None = cfg_field(None, help="an optional float")
    seeds: list[int] = cfg_field([0], help="a list of ints")
    words: list[str] = cfg_field([], help="a list of str")
    weights: list[float] = cfg_field([1.0], help="a list of floats")
    options: dict = cfg_field({}, help="a mapping")
    label_map: dict | None = cfg_field(None, help="an optional mapping")
    path: Path | None = cfg_field(None, help="a path")


GOOD = [
    ("count", 2, 2),
    ("count", 2.0, 2),  # an int-valued float is an int
    ("count", "7", 7),  # strings are parsed as on the command line
    ("count", "2.0", 2),
    ("rate", 1, 1.0),  # an int is a float
    ("rate", "1e-3", 1e-3),  # PyYAML reads 1e-3 as a string
    ("flag", False, False),
    ("flag", "yes", True),
    ("name", "abc", "abc"),
    ("size", None, None),
    ("size", "none", None),
    ("size", 64, 64),
    ("ratio", None, None),
    ("seeds", [0, 1, 2.0], [0, 1, 2]),
    ("seeds", (1, 2), [1, 2]),
    ("seeds", "0,1", [0, 1]),  # --set seeds=0,1
    ("words", ["a", "b"], ["a", "b"]),
    ("words", "a,b", ["a", "b"]),
    ("weights", [1, 0.5], [1.0, 0.5]),
    ("options", {"a": 1}, {"a": 1}),
    ("options", "{a: 1}", {"a": 1}),
    ("label_map", None, None),
    ("label_map", {"neg": 0, "pos": 1}, {"neg": 0, "pos": 1}),
    ("path", "runs/x", Path("runs/x")),
]


@pytest.mark.parametrize("name,value,expected", GOOD, ids=[f"{n}={v!r}" for n, v, _ in GOOD])
def test_values_that_fit(name, value, expected):
    cfg = build_config(Demo, {name: value})
    got = getattr(cfg, name)
    assert got == expected and type(got) is type(expected)


BAD = [
    ("count", 1.5, ["count=1.5", "(float) is not an integer", "(int)", "e.g. count: 3"]),
    ("count", True, ["count=True (bool) is not an integer"]),  # a bool is not an int
    ("count", "sixty-four", ["count='sixty-four'", "is not an integer"]),
    ("count", [1], ["count=[1] (list) is not an integer"]),
    ("count", None, ["count=None", "is not an integer"]),
    ("count", float("nan"), ["is not an integer"]),
    ("rate", "fast", ["rate='fast'", "is not a number", "e.g. rate: 0.5"]),
    ("rate", True, ["rate=True (bool) is not a number"]),
    ("rate", float("nan"), ["rate=nan", "not a finite number"]),
    ("rate", float("inf"), ["rate=inf", "not a finite number"]),
    ("rate", [0.1], ["rate=[0.1] (list) is not a number"]),
    ("flag", "maybe", ["flag='maybe'", "is not true or false", "e.g. flag: true"]),
    ("flag", 1, ["flag=1 (int) is not true or false"]),
    ("flag", [True], ["flag=[True] (list)"]),
    ("name", 2024, ["name=2024 (int) is not a string", "name: '2024'"]),
    ("name", ["a"], ["name=['a'] (list) is not a string"]),
    ("size", 1.5, ["size=1.5", "is not an integer or null", "(int | None)"]),
    ("size", "sixty-four", ["size='sixty-four'"]),
    ("seeds", 1, ["seeds=1 (int) is not a list of integers", "(list[int])", "e.g. seeds: [0]"]),
    ("seeds", [0, "one"], ["seeds[1]='one' (str) is not an integer", "the field is list[int]"]),
    ("seeds", [0, 1.5], ["seeds[1]=1.5"]),
    ("words", 3, ["words=3 (int) is not a list of strings", "e.g. words: [text]"]),
    ("words", ["a", 2], ["words[1]=2 (int) is not a string"]),
    ("weights", [1, "x"], ["weights[1]='x'", "is not a number"]),
    ("options", [1], ["options=[1] (list) is not a mapping", "e.g. options: {key: value}"]),
    ("options", 3, ["options=3 (int) is not a mapping"]),
    ("options", "{a: 1", ["options='{a: 1'", "not valid YAML"]),
    ("label_map", "neg", ["label_map='neg'", "is not a mapping (key: value) or null"]),
    ("path", 3, ["path=3 (int) is not a path"]),
]


@pytest.mark.parametrize("name,value,messages", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_values_that_do_not_fit(name, value, messages):
    with pytest.raises(ConfigError) as err:
        build_config(Demo, {name: value})
    for message in messages:
        assert message in str(err.value)


def test_prefix_names_the_option_and_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"train\.count=1\.5"):
        build_config(Demo, {"count": 1.5}, prefix="train")
    with pytest.raises(ConfigError, match="count=1.5"):
        build_config(Demo, count=1.5)
    assert build_config(Demo, count=4.0).count == 4


def test_command_line_values_are_checked_too(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo, prefix="d")
    cfg = build_config(Demo, {"count": 9}, parser.parse_args(["--d.count", "5", "--d.seeds", "[1, 2]"]), prefix="d")
    assert cfg.count == 5 and cfg.seeds == [1, 2]
    for argv, message in [(["--d.count", "1.5"], "expected an integer, got '1.5'"),
                          (["--d.rate", "fast"], "expected a number, got 'fast'"),
                          (["--d.flag", "maybe"], "expected a boolean"),
                          (["--d.options", "{a: 1"], "is not valid YAML"),
                          (["--d.options", "[1]"], "expected a mapping"),
                          (["--d.seeds", "[1, 2"], "is not valid YAML")]:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err
    nan = parser.parse_args(["--d.rate", "nan"])
    with pytest.raises(ConfigError, match="d.rate=nan .* not a finite number"):
        build_config(Demo, None, nan, prefix="d")


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown option 'cuont' for Demo \\(did you mean 'count'\\?\\)"):
        build_config(Demo, {"cuont": 1})
    with pytest.raises(ConfigError, match="must be a mapping of options"):
        build_config(Demo, [1, 2])


def test_real_configs():
    from kdshield.bench import GridConfig
    from kdshield.training.loop import TrainConfig

    assert build_config(TrainConfig, {"epochs": 2.0, "lr": "3e-4"}, prefix="train").epochs == 2
    with pytest.raises(ConfigError, match=r"train\.epochs=1\.5 \(float\) is not an integer"):
        build_config(TrainConfig, {"epochs": 1.5}, prefix="train")
    with pytest.raises(ConfigError, match=r"seeds=1 \(int\) is not a list of integers"):
        build_config(GridConfig, {"seeds": 1})
    with pytest.raises(ConfigError, match="floor='maybe'"):
        build_config(GridConfig, {"floor": "maybe"})


def test_check_field_value_directly():
    assert check_field_value(Demo, "count", 3.0) == 3
    with pytest.raises(ConfigError, match="x.count=1.5"):
        check_field_value(Demo, "count", 1.5, prefix="x")
