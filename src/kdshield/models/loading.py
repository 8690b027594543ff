"""Safe loading of untrusted checkpoints: builtin names, local directories, hub ids.

Models handed to kdshield are suspect by definition (that is the whole point), so loading is
safetensors-only and ``trust_remote_code`` stays off unless the user asks for it:

    path = resolve_model_ref("smollm2-135m")        # builtin embedded asset, prepared once
    path = resolve_model_ref("./third_party_model")  # local dir: must hold *.safetensors
    path = resolve_model_ref("org/model")            # hub id: needs a network, safetensors only
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kdshield import assets
from kdshield.errors import ModelLoadError, UnsafeModelError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DAMAGED_FIX = "re-download the model, or re-run the kdshield step that wrote it"


@dataclass(frozen=True)
class LoadOptions:
    """How far the user trusts a checkpoint. Both default to the safe choice."""

    allow_pickle: bool = False
    trust_remote_code: bool = False


def resolve_model_ref(ref: str | Path, options: LoadOptions = LoadOptions()) -> str:
    """A local directory path (or hub id) for ``ref``, checked for safe loading.

    Raises UnsafeModelError for a directory whose weights are only pickle files, unless
    ``options.allow_pickle`` is set, and ModelLoadError for a path that does not exist.
    """
    text = str(ref)
    if text in assets.ASSETS and assets.ASSETS[text].kind == "model":
        path = assets.model_dir(text)
        check_weight_files(path, fix=f"prepare it again: kdshield assets prepare {text} --force")
        return str(path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model reference {path} is a file; pass the model's directory "
                                 "(with config.json and *.safetensors)")
        check_local_dir(path, options)
        return str(path)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise ModelLoadError(f"model directory {path} does not exist")
    if "/" not in text:
        raise ModelLoadError(
            f"unknown model {text!r}: not a builtin ({', '.join(assets.MODEL_NAMES)}), not a local "
            "directory, and not a hub id of the form org/name")
    return text  # hub id: transformers enforces use_safetensors=True at load time


def check_local_dir(path: Path, options: LoadOptions = LoadOptions()) -> None:
    """Refuse directories that would need pickle to load, with the reason and the opt-in."""
    if (path / "kdshield.json").is_file() and (path / "adapter").is_dir():
        # A kdshield adapter directory: its head and adapter weights here, the base model when loaded.
        check_weight_files(path)
        check_weight_files(path / "adapter")
        return
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    safetensors = list(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()]
    if safetensors or index.is_file():
        check_weight_files(path)
        return
    if pickles and not options.allow_pickle:
        names = ", ".join(p.name for p in pickles[:3])
        raise UnsafeModelError(
            f"{path} holds only pickle weights ({names}). Loading pickle runs arbitrary code from the "
            "file, and this model is untrusted. Convert it to safetensors in a sandbox, or pass "
            "--allow-pickle if you trust its source.")
    if not pickles:
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ModelLoadError(f"{path} is damaged, not valid JSON ({err}): {DAMAGED_FIX}") from err


def check_weight_files(path: Path, fix: str = DAMAGED_FIX) -> None:
    """Check every ``*.safetensors`` file directly in ``path`` (see check_safetensors_file)."""
    for file in sorted(Path(path).glob("*.safetensors")):
        check_safetensors_file(file, fix=fix)


def check_safetensors_file(path: Path, fix: str = DAMAGED_FIX) -> None:
    """ModelLoadError naming ``path`` unless it is a complete safetensors file.

    Reads only the header (8-byte length + JSON) and checks that the tensors it lists cover the rest
    of the file exactly, as safetensors itself does at load time; a file cut short by a killed copy,
    download or save, or overwritten with other bytes, fails here with the fix instead of a
    deserialisation traceback.
    """
    path = Path(path)

    def damaged(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is damaged ({why}), not a complete safetensors file: {fix}")

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise damaged(f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n < 2 or n > size - 8:
                raise damaged(f"no valid safetensors header: it claims {n:,} bytes of metadata in a file of "
                              f"{size:,} bytes")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError):
        raise damaged("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a table of tensors")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise damaged(f"tensor {name!r} has no valid data offsets")
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise damaged(f"{what}: {size:,} bytes on disk, its header promises {expected:,}")


def warn_ignored_remote_code(path: str | Path, options: LoadOptions) -> None:
    """Log once per call when ``path``'s config.json / tokenizer_config.json name custom code
    (``auto_map``) that is not run because trust_remote_code is off: the model then loads as the
    plain architecture of its ``model_type``, which may not be what its author shipped."""
    if options.trust_remote_code:
        return
    directory = Path(path)
    if not directory.is_dir():
        return  # hub id: transformers refuses remote code it would need
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            for entry in (auto_map.values() if isinstance(auto_map, dict) else [auto_map]):
                found.extend(str(c) for c in (entry if isinstance(entry, (list, tuple)) else [entry]) if c)
    if found:
        shown = ", ".join(sorted(set(found))[:4])
        log.warning("%s ships its own model code in auto_map (%s); it was ignored because trust_remote_code is "
                    "off, and the model loads as the plain architecture of its model_type. Pass "
                    "--trust-remote-code (LoadOptions.trust_remote_code) only if you trust its source.",
                    directory, shown)
