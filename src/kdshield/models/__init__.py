"""Models: the sequence classifier, the causal-LM generator, PEFT adapters and safe loading.

    from kdshield.models import load_generator, attach_generator_adapter, AdapterConfig
    gen = load_generator("smollm2-135m")
    attach_generator_adapter(gen, AdapterConfig(kind="lora", r=8))

Names resolve lazily (PEP 562), so importing one submodule, e.g. ``kdshield.models.loading``,
does not import transformers through this package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "kdshield.models.adapters": ("ADAPTERS", "AdapterConfig", "attach_adapter"),
    "kdshield.models.classifier": ("Classifier", "ClassifierOutput", "load_classifier"),
    "kdshield.models.generator": ("Generator", "GeneratorOutput", "PooledFeatures", "attach_generator_adapter",
                                  "is_generator_dir", "load_generator", "pool_features"),
    "kdshield.models.loading": ("LoadOptions", "resolve_model_ref"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kdshield.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
