"""Exceptions with messages meant for users: each names the problem and the fix."""


class KDShieldError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ConfigError(KDShieldError, ValueError):
    """An option value is invalid (names the field and the allowed range)."""


class DataError(KDShieldError, ValueError):
    """A dataset is missing, malformed or unusable (names the file, the row and the fix)."""


class AssetError(KDShieldError):
    """An embedded asset package is missing or broken (names the install command)."""


class UnsafeModelError(KDShieldError):
    """A model would need unsafe loading (pickle weights, remote code) that the user did not allow."""


class ModelLoadError(KDShieldError):
    """A model reference cannot be resolved or loaded."""


class RunStateError(ConfigError):
    """Saved work (a checkpoint, a run folder, a cached model) is damaged or was made under other
    settings than the ones asked for now (names what differs and the way out)."""
