"""Registry: what ``register`` accepts (the base type, the object's own name, one entry per name), and
the project's three registries with every entry they hold."""

from __future__ import annotations

from typing import ClassVar

import pytest

from kdshield.errors import ConfigError
from kdshield.registry import Registry


class Base:
    name: ClassVar[str] = ""


class Good(Base):
    """A good one.

    More text that the description leaves out."""

    name = "good"


class Unnamed(Base):
    pass


class Stranger:
    name = "stranger"


def test_register_get_names_describe():
    reg = Registry("thing", base=Base)
    assert reg.register("good")(Good) is Good  # a decorator that returns the class
    reg.register("unnamed", description="no name attribute of its own")(Unnamed)
    assert reg.get("good") is Good and reg.names() == ["good", "unnamed"]
    assert reg.describe() == {"good": "A good one.", "unnamed": "no name attribute of its own"}
    assert "good" in reg and "bad" not in reg
    with pytest.raises(ConfigError, match=r"unknown thing 'bad'; available: good, unnamed"):
        reg.get("bad")


def test_a_class_outside_the_base_is_a_type_error():
    reg = Registry("thing", base=Base)
    with pytest.raises(TypeError, match=r"thing 'stranger': Stranger is not a subclass of Base"):
        reg.register("stranger")(Stranger)
    with pytest.raises(TypeError, match="is not a Base"):
        reg.register("function")(lambda: None)  # not a class: it must be an instance of the base
    reg.register("instance")(Unnamed())
    assert "stranger" not in reg and "function" not in reg and reg.names() == ["instance"]
    assert Registry("anything").register("stranger")(Stranger) is Stranger  # no base: no check


def test_a_different_own_name_is_a_value_error():
    reg = Registry("thing", base=Base)
    with pytest.raises(ValueError, match=r"thing 'other': Good calls itself 'good'"):
        reg.register("other")(Good)
    assert "other" not in reg
    reg.register("anything")(Unnamed)  # name "" (inherited from Base): nothing to compare
    obj = type("Obj", (), {"name": "obj"})()
    with pytest.raises(ValueError, match="calls itself 'obj'"):
        Registry("thing").register("x")(obj)  # instances are checked too
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("")


def test_registered_twice():
    reg = Registry("thing", base=Base)
    reg.register("good")(Good)
    with pytest.raises(ValueError, match="thing 'good' is registered twice"):
        reg.register("good")(Good)
    assert reg.get("good") is Good


def test_a_base_defined_after_the_registry():
    reg = Registry("thing", base=lambda: Late)

    class Late:
        pass

    class Sub(Late):
        pass

    reg.register("sub")(Sub)
    assert reg.base is Late
    with pytest.raises(TypeError, match="not a subclass of"):
        reg.register("good")(Good)
    with pytest.raises(TypeError, match="base must be a class"):
        Registry("thing", base=lambda: "Late").register("sub")(Sub)


def test_project_registries_hold_their_base_and_own_names():
    import kdshield.defenses  # noqa: F401  (imports every defense and detector module)
    from kdshield.attacks.triggers import TRIGGERS, Trigger
    from kdshield.defenses import DEFENSES, DETECTORS
    from kdshield.defenses.base import Defense

    assert DEFENSES.base is Defense and TRIGGERS.base is Trigger
    assert set(DEFENSES.names()) >= {"back-translation", "bedkd", "fine-pruning", "fine-tuning", "lora", "merge",
                                     "onion", "psim", "quantization", "rap", "scpd", "strip", "w2s"}
    assert set(DETECTORS.names()) >= {"mepd", "psim", "rap", "strip"}
    assert set(TRIGGERS.names()) >= {"badnet", "insent", "proattack", "syntactic"}
    for reg in (DEFENSES, DETECTORS, TRIGGERS):
        for name in reg.names():
            cls = reg.get(name)
            assert cls.name == name, (reg.kind, name)
            assert reg.base is None or issubclass(cls, reg.base)
