"""Safe loading of untrusted checkpoints: builtin names, local directories, hub ids.

Models handed to kdshield are suspect by definition (that is the whole point), so loading is
safetensors-only and ``trust_remote_code`` stays off unless the user asks for it:

    path = resolve_model_ref("smollm2-135m")        # builtin embedded asset, prepared once
    path = resolve_model_ref("./third_party_model")  # local dir: must hold *.safetensors
    path = resolve_model_ref("org/model")            # hub id: needs a network, safetensors only

``LoadOptions`` also says how the weights are held: ``dtype`` (auto | bf16 | fp16 | fp32, resolved
by ``kdshield.inference.resolve_load_dtype``) and ``quantize`` (none | 4bit | 8bit: a bitsandbytes
base for QLoRA, CUDA only). ``check_load_options`` refuses what cannot run here before any work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kdshield import assets
from kdshield.errors import ConfigError, ModelLoadError, UnsafeModelError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DAMAGED_FIX = "re-download the model, or re-run the kdshield step that wrote it"


LOAD_DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZE = ("none", "4bit", "8bit")
GPU_EXTRA_FIX = "pip install 'kdshield[gpu]' (bitsandbytes)"


@dataclass(frozen=True)
class LoadOptions:
    """How far the user trusts a checkpoint (both default to the safe choice), and how its weights
    are held in memory."""

    allow_pickle: bool = False
    trust_remote_code: bool = False
    # auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with
    # avx512_bf16/AMX), else fp32. Heads and PEFT adapters stay fp32 either way.
    dtype: str = "auto"
    # 4bit: NF4 with double quantisation, bf16 compute (QLoRA); 8bit: LLM.int8. CUDA + bitsandbytes.
    quantize: str = "none"

    def __post_init__(self):
        if self.dtype not in LOAD_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {list(LOAD_DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize={self.quantize!r} is not one of {list(QUANTIZE)}")

    @property
    def resolved_dtype(self) -> str:
        """The dtype name ``dtype`` resolves to on this machine (bf16, fp16 or fp32)."""
        from kdshield.inference import load_dtype_name, resolve_load_dtype

        return load_dtype_name(resolve_load_dtype(self.dtype))

    def key(self) -> dict:
        """What the weights' format adds to the settings that key cached work (poisoned models, run
        directories, grid cells): the resolved dtype and the quantisation, left out where they are
        fp32 and none, the format every key made before these options existed was made in (so those
        keys stay valid, and a bf16 or 4-bit run never matches fp32 work)."""
        out = {}
        dtype = self.resolved_dtype
        if dtype != "fp32":
            out["dtype"] = dtype
        if self.quantize != "none":
            out["quantize"] = self.quantize
        return out

    @property
    def weights_format(self) -> str:
        """What a results record's ``load_dtype`` says for models loaded with these options: the
        resolved dtype, or nf4 / int8 for a quantised base."""
        return {"4bit": "nf4", "8bit": "int8"}.get(self.quantize) or self.resolved_dtype

    def run_settings(self) -> dict:
        """The load options as they enter a run directory's settings (``runs.RunDir``)."""
        return {"allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code, **self.key()}

    def for_full_training(self, what: str = "full fine-tuning") -> LoadOptions:
        """These options for a model whose every weight trains: fp32 weights (auto resolves to fp32;
        bf16 compute comes from ``--train.precision``). An explicit bf16/fp16 or a quantised base is
        a ConfigError: AdamW on bf16 weights without an fp32 master copy (the training loop keeps
        none) drops every update below the weight's resolution (2^-8 relative), and quantised
        weights cannot train at all."""
        if self.quantize != "none":
            raise ConfigError(f"{what} trains every weight of the model and cannot run on a quantised "
                              f"({self.quantize}) base; drop --quantize (it is for LoRA and the other PEFT "
                              "adapters)")
        if self.dtype in ("bf16", "fp16"):
            raise ConfigError(f"{what} trains every weight and needs fp32 weights (AdamW steps below "
                              f"{self.dtype}'s resolution are lost without an fp32 master copy); pass "
                              "--dtype fp32 or auto (bf16 compute comes from --train.precision)")
        return dataclasses.replace(self, dtype="fp32")


def check_load_options(options: LoadOptions) -> LoadOptions:
    """ConfigError, before any work, for load options this machine cannot run: a quantised base
    without a CUDA GPU or without bitsandbytes, fp16 on a machine without a GPU. Returns ``options``."""
    import torch

    if options.quantize != "none":
        if not torch.cuda.is_available():
            raise ConfigError(f"--quantize {options.quantize} needs a CUDA GPU (bitsandbytes' quantised "
                              "kernels); this machine has none. Drop --quantize, or use --dtype bf16 to halve "
                              "the weights' memory instead")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"--quantize {options.quantize} needs bitsandbytes, which is not installed: "
                              f"{GPU_EXTRA_FIX}")
    if options.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--dtype fp16 needs a CUDA GPU: on CPU, fp16 matmuls are slow or unsupported; use "
                          "--dtype bf16 or fp32 (auto picks the best this machine has)")
    return options


def from_pretrained_kwargs(options: LoadOptions, dtype) -> dict:
    """The keyword arguments of ``from_pretrained`` for untrusted weights loaded under ``options``:
    safetensors unless pickle is allowed, remote code only when trusted, and for a quantised base
    the bitsandbytes config (ConfigError here without CUDA / bitsandbytes). bitsandbytes quantises
    while loading onto the GPU; the weights it leaves (embeddings, norms, an LM head) take the
    compute dtype."""
    import torch

    kwargs = {"trust_remote_code": options.trust_remote_code, "dtype": dtype}
    if not options.allow_pickle:
        kwargs["use_safetensors"] = True
    quantization = quantization_config(options)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": torch.cuda.current_device()},
                      dtype=quantization.bnb_4bit_compute_dtype if options.quantize == "4bit" else dtype)
    return kwargs


def load_pretrained(auto_class, path: str, options: LoadOptions, dtype, *, check_config=None):
    """``(auto_class.from_pretrained(path), its config)`` under ``options`` (``from_pretrained_kwargs``),
    with the loader's failures as ModelLoadErrors naming the fix: a missing or unreadable model,
    custom code not trusted, a damaged weight file. ``check_config(config)`` may refuse the
    architecture before any weight loads."""
    from transformers import AutoConfig

    kwargs = from_pretrained_kwargs(options, dtype)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        if check_config is not None:
            check_config(config)
        model = auto_class.from_pretrained(path, **kwargs)
    except ModelLoadError:
        raise
    except OSError as err:
        raise ModelLoadError(f"cannot load model from {path}: {err}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{path} needs custom code; pass --trust-remote-code only if you trust "
                                 f"its source ({err})") from err
        raise
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"cannot load model from {path}: a weight file is damaged ({err}); re-download "
                             "the model, or re-run the kdshield step that wrote it") from err
    return model, config


def quantization_config(options: LoadOptions):
    """transformers' BitsAndBytesConfig for ``options.quantize`` (None for ``none``), checked first."""
    if options.quantize == "none":
        return None
    check_load_options(options)
    import torch
    from transformers import BitsAndBytesConfig

    if options.quantize == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


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
