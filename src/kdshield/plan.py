"""A memory plan: what one training process of kdshield holds, by arithmetic, before anything runs.

    shape = model_shape("tests/fixtures/llama3-8b-config.json")   # or a builtin name / model dir
    plan = plan_memory(shape, PlanSettings(mode="qlora", batch_size=1, max_length=512, gpu_memory_gib=24))
    print(plan.table())                  # or plan.to_dict() for JSON

Only the model's ``config.json`` is read (``transformers.AutoConfig`` from a local file or
directory); no weights are loaded and nothing is downloaded. The student is what kdshield trains
today: a classifier (``kdshield.models.classifier``: the decoder backbone without its LM head, plus
a linear head of ``hidden x num_labels`` weights, tiny next to the backbone); ``task="causal-lm"``
plans the backbone with its LM head and the vocabulary logits instead (the generative path).
Llama-style decoders are modelled (``llama``, ``mistral``, ``qwen2``: pre-norm RMSNorm, rotary
attention with grouped KV heads through SDPA, gated SiLU MLP).

Per process, in bytes (``N`` = processes, ``P`` = parameters, ``B`` = batch size, ``T`` = tokens
per example, every batch padded to ``T``):

- **weights**: base parameters x 4 (fp32) or 2 (bf16/fp16); with ``qlora`` the decoder's linear
  layers are NF4 with double quantisation, ``NF4_BYTES_PER_PARAM`` = 0.5 + 1/64 + 4/(64*256) bytes
  (4-bit codes, an 8-bit absmax per block of 64, an fp32 absmax per 256 blocks: the 4.127 bits of
  Dettmers et al. 2023, QLoRA, section 3), the embeddings and norms stay in ``dtype``. LoRA adapters
  are fp32 (peft upcasts adapters of a half-precision base). Full fine-tuning over ``N > 1``
  processes shards them (FSDP full sharding): / N.
- **gradients**: trainable parameters x their own bytes (fp32 adapters: 4; full: ``dtype``).
- **optimizer** (AdamW): 2 fp32 moments = 8 bytes per trainable parameter, plus a 4-byte fp32
  master copy per trainable parameter that is stored in bf16/fp16 (mixed-precision training).
- **activations**: the tensors autograd saves for backward, counted op by op for the Llama layer as
  transformers runs it (RMSNorm upcasts to fp32; SDPA keeps q, k, v, its output and the fp32
  log-sum-exp and never the T x T attention matrix; a frozen linear saves nothing for its input
  gradient, a trainable or LoRA-adapted one saves its input). Per decoder layer and token, with
  ``a`` the compute bytes, ``d`` hidden, ``q = heads x head_dim``, ``k' = (heads if the batch is
  padded, as transformers then repeats the KV heads, else kv_heads) x head_dim``, ``i``
  intermediate, ``h`` heads, ``r`` the LoRA rank:

      attention  4d + 4 (norm input in fp32, rsqrt)   + a(q + 2k' + q) + 4h (q, k, v, output, lse)
                 + a T (the padding mask, in the query's dtype)
      MLP        4d + 4 (norm input, rsqrt)           + 3 a i (gate, SiLU output, up)
      LoRA       per adapted module: its input (shared when already in the adapter's dtype, else
                 a copy) + r x 4 (the A output)
      full       + the norms' normalised inputs 2 x d x rb (rb: the residual stream's bytes) +
                 the q/k/v and gate/up inputs 2 x d x rb + the down input a i

  which is, in fp32 (a = rb = 4) with LoRA on q and v: ``4(3d + 2q + 2k' + h + T + 3i + 2r + 2)``
  and for full fine-tuning ``4(6d + 2q + 2k' + h + T + 4i + 2)``. The first layer of a run with
  frozen embeddings saves no input. With bf16 autocast on fp32 weights (kdshield's default on GPUs,
  ``precision="bf16"``) every matmul saves bf16 copies of its input and of its *weight*: 2 bytes
  per linear parameter per step, the whole model once. The final norm saves 4d + 4 per token, the
  rotary cos/sin 2 x T x head_dim x rb per batch; the classification head only ``B x (4d + 8 + 8k)``,
  while ``causal-lm`` keeps the logits (a V) and their fp32 log-softmax (4 V) per token.
  **Activation checkpointing** keeps only each layer's input (``d x rb`` per token per layer), then
  recomputes one layer at a time in backward: ``L d rb + one layer's saved set`` per token.
- **workspace**: the gradients of one layer's saved tensors in backward (at most one layer's saved
  set at a time), the dequantised weight of the largest linear layer (``qlora``), and AdamW's step
  temporaries (kdshield's fused AdamW works one parameter tensor at a time, on CPU and GPU: at most
  one fp32 tensor the size of the largest parameter).

Peak: gradients are set to None after each step and appear while backward frees the activations,
so the two are not held at once in full:

    peak = weights + optimizer + master + FSDP gather
           + max(activations + workspace + autocast weight copies + dequant (+ gradients with
                 grad_accum > 1), gradients + optimizer step temporaries)

Every term but the constants grows linearly in ``B``, so the fitting batch size is the inverted
formula ``floor((memory - reserve - fixed) / per_example)`` (0 when even the optimizer step does
not fit); on a GPU ``GPU_RESERVE_GIB`` of the memory is left for the CUDA context.

The activation rules equal, byte for byte, the tensors autograd saves in a small random Llama on
CPU (``tests/test_plan.py``: LoRA and full, fp32, bf16 weights and bf16 autocast, padded or not).
The whole plan was checked against the measured peak RSS of SmolLM2-135M in fp32 on CPU, batch 16 x
64 tokens, 3 steps (``benchmarks/plan_check.py``, ``benchmarks/results/plan-check.jsonl``): LoRA
(r 8, q/v) planned 1576 MiB, measured 2091 MiB (peak RSS minus the RSS after imports), ratio 0.75;
full fine-tuning planned 2995 MiB, measured 3717 MiB, ratio 0.81: within the issue's 25 %, and
below in both. The shortfall is about half the activation term in both runs (515 and 722 MiB),
while the activation rules themselves are exact; what RSS holds beyond live tensors (the C
allocator's freed but retained heap, the tokenizer, code pages touched by the first kernels) is not
modelled, so on CPU read the plan as the tensors' peak, some 20-25 % under the process's. No
calibration constant was added. The GPU terms (``GPU_RESERVE_GIB``, AdamW temporaries, FSDP
gather, NF4, autocast copies under CUDA) are arithmetic from the libraries' layouts, not measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdshield.config import check_choice, check_range
from kdshield.errors import ConfigError, ModelLoadError

GIB = 1024 ** 3
MIB = 1024 ** 2

MODES = ("lora", "full", "qlora")
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("gpu", "cpu")
TASKS = ("classify", "causal-lm")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Decoders whose layer is the Llama layer (pre-norm RMSNorm, rotary GQA attention, gated SiLU MLP).
LLAMA_STYLE = ("llama", "mistral", "qwen2")

# NF4 with double quantisation (bitsandbytes, QLoRA's recipe): 4-bit codes, one 8-bit absmax per
# block of 64 weights, one fp32 absmax per 256 of those blocks (QLoRA paper, section 3: 4.127 bits).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Memory of a GPU that tensors cannot use: the CUDA context, cuBLAS workspaces and the caching
# allocator's rounding. A planning margin, not a measurement (this project has not run on a GPU);
# PyTorch's CUDA context alone takes some 0.3-0.6 GiB depending on the GPU and CUDA version.
GPU_RESERVE_GIB = 1.0


# --- the model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on (from its config.json)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    source: str = ""

    @classmethod
    def from_config(cls, config, source: str = "") -> ModelShape:
        model_type = getattr(config, "model_type", None)
        if model_type not in LLAMA_STYLE:
            raise ConfigError(
                f"{source or 'this model'} is a {model_type!r} model; the memory plan models Llama-style decoders "
                f"({', '.join(LLAMA_STYLE)}: pre-norm RMSNorm, rotary attention with KV heads, gated SiLU MLP) and "
                "would be wrong for another layout")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        return cls(model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate_size=config.intermediate_size,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   source=source)

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """(in_features, out_features, bias) of each linear layer of one decoder layer."""
        d, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (d, q, self.qkv_bias), "k_proj": (d, kv, self.qkv_bias), "v_proj": (d, kv, self.qkv_bias),
                "o_proj": (q, d, self.o_bias), "gate_proj": (d, i, self.mlp_bias), "up_proj": (d, i, self.mlp_bias),
                "down_proj": (i, d, self.mlp_bias)}

    def layer_linear_weights(self) -> int:
        return sum(n_in * n_out for n_in, n_out, _ in self.linear_shapes().values())

    def layer_biases(self) -> int:
        return sum(n_out for _, n_out, bias in self.linear_shapes().values() if bias)

    def layer_params(self) -> int:
        """One decoder layer: its linear weights and biases and its two RMSNorm weights."""
        return self.layer_linear_weights() + self.layer_biases() + 2 * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """The LM head's own parameters (0 when it is tied to the embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def backbone_params(self) -> int:
        """Embeddings + decoder layers + final norm: what kdshield's classifier loads (``AutoModel``)."""
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size

    def causal_lm_params(self) -> int:
        """The model as a causal LM (the count a model card gives): the backbone plus its LM head."""
        return self.backbone_params() + self.lm_head_params()


def model_shape(ref: str | Path) -> ModelShape:
    """The shape of ``ref``: a builtin name, a model directory, a config.json, or a hub id already in
    the local Hugging Face cache. Reads only the config; never loads weights, never downloads."""
    from kdshield import assets
    from kdshield.models.loading import read_json, resolve_model_ref, warn_ignored_remote_code

    text = str(ref)
    if text in assets.ASSETS and assets.ASSETS[text].kind == "model":
        status = assets.asset_status(text)
        if status == "missing":
            raise ModelLoadError(f"builtin model {text} is not installed; run: kdshield assets install {text}, then "
                                 f"kdshield assets prepare {text}")
        if status != "ready":
            raise ModelLoadError(f"builtin model {text} is not prepared; run: kdshield assets prepare {text} "
                                 "(the plan reads only its config.json and converts nothing)")
        path = Path(resolve_model_ref(text))
        return _shape_from(path / "config.json", source=text)
    path = Path(text).expanduser()
    if path.is_file():
        return _shape_from(path, source=text)
    if path.is_dir():
        if (path / "config.json").is_file():
            warn_ignored_remote_code(path, _safe_options())
            return _shape_from(path / "config.json", source=text)
        meta_file = path / "kdshield.json"
        if meta_file.is_file():  # a kdshield adapter directory: plan its base model
            meta = read_json(meta_file)
            base = (meta.get("adapter") or {}).get("base") if isinstance(meta, dict) else None
            if base:
                return model_shape(base)
        raise ModelLoadError(f"{path} has no config.json: pass a model directory, its config.json or a builtin "
                             f"name ({', '.join(assets.MODEL_NAMES)})")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text or text.endswith(".json")
    if looks_local:
        raise ModelLoadError(f"no model config at {path}: the file or directory does not exist (pass a config.json, "
                             f"a model directory or a builtin name: {', '.join(assets.MODEL_NAMES)})")
    return _shape_from_hub_cache(text)


def _safe_options():
    from kdshield.models.loading import LoadOptions

    return LoadOptions()


def _shape_from(config_file: Path, source: str) -> ModelShape:
    from transformers import AutoConfig

    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelLoadError(f"cannot read {config_file}: {err.strerror or err}") from None
    except ValueError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON ({err}): pass a model's config.json") from None
    try:
        config = AutoConfig.from_pretrained(str(config_file), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{config_file} is not a config transformers can read ({err})") from None
    return ModelShape.from_config(config, source=source)


def _shape_from_hub_cache(repo_id: str) -> ModelShape:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{repo_id}: its config.json is not in the local Hugging Face cache and the plan never downloads "
            f"({type(err).__name__}). Fetch it once (huggingface-cli download {repo_id} config.json) or pass a "
            "config.json / model directory") from None
    return ModelShape.from_config(config, source=repo_id)


# --- the settings ------------------------------------------------------------------------------
@dataclass
class PlanSettings:
    """The training command's settings that memory depends on (kdshield's defaults)."""

    mode: str = "lora"  # lora | full (all weights) | qlora (LoRA on an NF4 base)
    dtype: str | None = None  # base weights: fp32 | bf16 | fp16; None: fp32 (lora, full), bf16 (qlora)
    precision: str = "auto"  # TrainConfig.precision: bf16 autocast or fp32; auto: bf16 on a GPU, fp32 on CPU
    device: str = "gpu"
    batch_size: int = 16
    max_length: int = 64
    lora_r: int = 8
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    activation_checkpointing: bool = False
    processes: int = 1
    grad_accum: int = 1
    num_labels: int = 2
    task: str = "classify"
    padded: bool = True  # batches padded (a mask; transformers then repeats the KV heads)
    gpu_memory_gib: float | None = None

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if self.dtype is None:
            self.dtype = "bf16" if self.mode == "qlora" else "fp32"
        check_choice("dtype", self.dtype, list(DTYPES))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("task", self.task, TASKS)
        check_range("batch_size", self.batch_size, 1, 1 << 20)
        check_range("max_length", self.max_length, 2, 1 << 20)
        check_range("lora_r", self.lora_r, 1, 4096)
        check_range("processes", self.processes, 1, 4096)
        check_range("grad_accum", self.grad_accum, 1, 4096)
        check_range("num_labels", self.num_labels, 2, 1 << 20)
        if self.gpu_memory_gib is not None:
            check_range("gpu_memory", self.gpu_memory_gib, 0, None, lo_open=True)
        targets = tuple(self.target_modules)
        if targets in (("all-linear",), ("all",)):
            targets = LINEARS
        unknown = [t for t in targets if t not in LINEARS]
        if unknown or not targets:
            raise ConfigError(f"LoRA target modules {list(unknown or targets)} are not linear layers of a Llama-style "
                              f"layer: use some of {', '.join(LINEARS)} (or all-linear)")
        self.target_modules = tuple(t for t in LINEARS if t in targets)

    @property
    def compute_precision(self) -> str:
        """bf16 or fp32: the autocast precision kdshield's loop would run (auto as on a bf16 GPU / a CPU
        without bf16)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.device == "gpu" else "fp32"

    @property
    def fsdp(self) -> bool:
        return self.mode == "full" and self.processes > 1


# --- activations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Regime:
    full: bool
    lora: tuple[str, ...]
    rank: int
    a: int  # bytes of the compute (activation) dtype
    rb: int  # bytes of the residual stream (the non-quantised weights' dtype)
    autocast: bool  # bf16 autocast over fp32 weights
    quantised: bool
    padded: bool
    T: int

    @property
    def adapter_bytes(self) -> int:
        """The dtype a LoRA matmul computes in: fp32 adapters, bf16 under autocast."""
        return 2 if self.autocast else 4


def _regime(s: PlanSettings) -> _Regime:
    w = DTYPES[s.dtype]
    autocast = s.compute_precision == "bf16" and w == 4 and s.mode != "qlora"
    return _Regime(full=s.mode == "full", lora=() if s.mode == "full" else s.target_modules, rank=s.lora_r,
                   a=2 if (autocast or w == 2) else 4, rb=w, autocast=autocast, quantised=s.mode == "qlora",
                   padded=s.padded, T=s.max_length)


class _Saved:
    """Tensors autograd keeps for backward, keyed by identity (a tensor saved by two ops counts once)."""

    def __init__(self):
        self.items: dict = {}

    def add(self, key, elems: int, nbytes: int) -> None:
        self.items.setdefault(key, elems * nbytes)

    def total(self) -> int:
        return sum(self.items.values())


def _layer(shape: ModelShape, r: _Regime, x_grad: bool) -> tuple[int, int, bool]:
    """(bytes saved per token, bytes of bf16 weight copies saved per step, output requires grad) for
    one decoder layer whose input requires grad iff ``x_grad``."""
    saved = _Saved()
    copies = 0
    d, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    repeat = r.padded and shape.num_kv_heads < shape.num_heads  # transformers' repeat_kv under a mask
    kv = (shape.num_heads if repeat else shape.num_kv_heads) * shape.head_dim
    lin = shape.linear_shapes()

    def norm(tag: str, grad_in: bool) -> None:
        if grad_in:  # x**2 and x * rsqrt save the fp32 input and rsqrt; weight * h saves h
            saved.add((tag, "in"), d, 4)
            saved.add((tag, "rsqrt"), 1, 4)
            if r.full:
                saved.add((tag, "h"), d, r.rb)

    def linear(name: str, key: str, elems: int, nbytes: int, grad_in: bool) -> bool:
        nonlocal copies
        n_in, n_out, _ = lin[name]
        if r.full:  # the weight gradient needs the input
            if r.autocast and nbytes != 2:
                saved.add((key, "bf16", name), elems, 2)  # autocast's own copy, one per op
            else:
                saved.add(key, elems, nbytes)
        if r.autocast and (grad_in or r.full):  # the input gradient needs the (bf16 copy of the) weight
            copies += 2 * n_in * n_out
        if name in r.lora:
            cd = r.adapter_bytes
            if r.autocast or nbytes != cd:  # peft casts the input to the adapter's dtype, autocast to bf16
                saved.add((key, cd, name), elems, cd)
            else:
                saved.add(key, elems, nbytes)
            saved.add(("lora_a", name), r.rank, cd)
            if r.autocast:
                copies += 2 * r.rank * (n_out + (n_in if grad_in else 0))
        return grad_in or r.full or name in r.lora

    norm("input_norm", x_grad)
    grads = [linear(name, "n1", d, r.rb, x_grad) for name in ("q_proj", "k_proj", "v_proj")]
    attn_grad = any(grads)
    if attn_grad:  # SDPA (flash / memory-efficient): q, k, v, output, fp32 log-sum-exp
        saved.add("q", q, r.a)
        saved.add("k", kv, r.a)
        saved.add("v", kv, r.a)
        saved.add("O", q, r.a)
        saved.add("lse", shape.num_heads, 4)
        if r.padded:
            saved.add("mask", r.T, r.a)
    o_grad = linear("o_proj", "O", q, r.a, attn_grad)
    mid_grad = x_grad or o_grad
    norm("post_norm", mid_grad)
    gate_grad = linear("gate_proj", "n2", d, r.rb, mid_grad)
    up_grad = linear("up_proj", "n2", d, r.rb, mid_grad)
    if gate_grad or up_grad:  # silu(gate) saves gate; silu(gate) * up saves both factors
        saved.add("gate", i, r.a)
        saved.add("act", i, r.a)
        saved.add("up", i, r.a)
    down_grad = linear("down_proj", "p", i, r.a, gate_grad or up_grad)
    return saved.total(), copies, mid_grad or down_grad


@dataclass
class Activations:
    """Activation memory of one forward/backward, split the way it scales (bytes)."""

    per_token: float  # saved per token over the whole model (layers, final norm, token ids, logits)
    per_example: float  # saved per example, independent of tokens (the classification head)
    per_batch: float  # per forward, independent of the batch size (rotary cos/sin)
    layer_per_token: float  # one decoder layer's saved set per token (not the first)
    recompute_per_token: float  # with checkpointing: the one layer recomputed in backward (in per_token)
    workspace_per_token: float  # backward transients: one layer's gradients (+ the logits' gradient)
    weight_copies: float  # bf16 weight copies saved under autocast (per step, independent of B)

    def saved(self, batch_size: int, tokens: int) -> float:
        return self.per_token * batch_size * tokens + self.per_example * batch_size + self.per_batch

    def forward_saved(self, batch_size: int, tokens: int) -> float:
        """What autograd holds at the end of the forward (without the recomputed layer), head excluded:
        the number ``tests/test_plan.py`` compares with the tensors autograd really saves."""
        return (self.per_token - self.recompute_per_token) * batch_size * tokens + self.per_batch

    def workspace(self, batch_size: int, tokens: int) -> float:
        return self.workspace_per_token * batch_size * tokens


def activations(shape: ModelShape, s: PlanSettings) -> Activations:
    """The activation terms of ``s`` (see the module docstring for the rules)."""
    r = _regime(s)
    d, L = shape.hidden_size, shape.num_layers
    # The embeddings' output requires grad with full fine-tuning, and with checkpointing (peft's
    # enable_input_require_grads); otherwise the first layer's input is a constant.
    first_grad = r.full or s.activation_checkpointing
    first, first_copies, grad = _layer(shape, r, first_grad)
    rest, rest_copies, _ = _layer(shape, r, grad)
    final = 4 * d + 4 + (d * r.rb if r.full else 0)  # final RMSNorm
    if r.full:
        final += 8  # the embedding's backward keeps the token ids (int64)
    per_example = 0.0
    logits_ws = 0.0
    if s.task == "classify":
        per_example = 4 * d + 8 + 8 * s.num_labels  # pooled feature, its index, logits and log-softmax
    else:
        lm_in = (2 if r.autocast else r.rb) * d if r.full else 0
        final += lm_in + shape.vocab_size * (r.a + 4)  # logits kept + fp32 log-softmax for the loss
        logits_ws = 4 * shape.vocab_size  # the logits' gradient
    recompute = 0
    if s.activation_checkpointing:
        recompute = rest
        per_token = L * d * r.rb + recompute + final  # layer inputs + one layer recomputed in backward
        # full: autocast caches the bf16 casts of trainable weights for the whole forward
        copies = rest_copies if not r.full else first_copies + (L - 1) * rest_copies
    else:
        per_token = first + (L - 1) * rest + final
        copies = first_copies + (L - 1) * rest_copies
    per_batch = 2 * s.max_length * shape.head_dim * r.rb  # rotary cos / sin, shared by all layers
    return Activations(per_token=per_token, per_example=per_example, per_batch=per_batch, layer_per_token=rest,
                       recompute_per_token=recompute, workspace_per_token=rest + logits_ws, weight_copies=copies)


# --- the plan ----------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per process; ``peak`` with the settings' batch size, ``fit_batch_size`` for the memory."""

    model: dict
    settings: dict
    params_total: int
    params_trainable: int
    params_causal_lm: int
    head_params: int
    weights: float
    gradients: float
    optimizer: float
    master: float
    activations: float
    workspace: float
    weight_copies: float
    dequant: float
    step_temporaries: float
    fsdp_gather: float
    ddp_buckets: float
    fixed: float  # peak's terms independent of the batch size
    backward_constant: float
    step_phase: float
    per_example: float
    peak: float
    phase: str  # "backward" or "optimizer step": which phase sets the peak
    memory_gib: float | None = None
    reserve_gib: float = 0.0
    fits: bool | None = None
    fit_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def peak_for(self, batch_size: int) -> float:
        return self.fixed + max(self.backward_constant + self.per_example * batch_size, self.step_phase)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["gib"] = {k: round(out[k] / GIB, 3) for k in (
            "weights", "gradients", "optimizer", "master", "activations", "workspace", "weight_copies", "dequant",
            "step_temporaries", "fsdp_gather", "ddp_buckets", "peak", "per_example")}
        return out

    def table(self) -> str:
        return format_table(self)


def fit_batch_size(fixed: float, backward_constant: float, step_phase: float, per_example: float,
                   budget: float) -> int:
    """The largest batch size whose peak ``fixed + max(backward_constant + per_example * B, step_phase)``
    stays within ``budget`` bytes (0 when even one example, or the optimizer step, does not fit)."""
    if budget < fixed + step_phase:
        return 0
    room = budget - fixed - backward_constant
    return max(0, math.floor(room / per_example)) if per_example > 0 else 0


def plan_memory(shape: ModelShape, s: PlanSettings) -> MemoryPlan:
    """The memory plan of one training process of ``s`` on ``shape``."""
    w = DTYPES[s.dtype]
    d, L = shape.hidden_size, shape.num_layers
    lin = shape.linear_shapes()
    n = s.processes if s.fsdp else 1
    head = d * s.num_labels + s.num_labels if s.task == "classify" else 0
    lm_head = shape.lm_head_params() if s.task == "causal-lm" else 0
    total = shape.backbone_params() + head + lm_head
    notes: list[str] = []
    if s.task == "classify":
        lm = (f"the LM head's {shape.lm_head_params():,} parameters are not loaded" if shape.lm_head_params()
              else "its LM head is tied to the embeddings")
        notes.append(f"classifier: the backbone ({lm}, no vocabulary logits) + a linear head of {head:,} "
                     "parameters, trainable in every mode: tiny")

    lora_params = L * sum(s.lora_r * (lin[t][0] + lin[t][1]) for t in s.target_modules) if s.mode != "full" else 0
    if s.mode == "full":
        trainable = total
        trainable_groups = [(total, w)]  # (parameters, bytes each)
        weights = total * w
        largest = max(shape.embedding_params(), max(a * b for a, b, _ in lin.values()))
    else:
        trainable = lora_params + head
        trainable_groups = [(lora_params, 4), (head, w)]
        frozen_linear = L * shape.layer_linear_weights()
        frozen_other = total - head - frozen_linear
        if s.mode == "qlora":
            weights = frozen_linear * NF4_BYTES_PER_PARAM + frozen_other * w
            notes.append(f"qlora: {frozen_linear:,} linear weights in NF4 ({NF4_BYTES_PER_PARAM:.4f} bytes each), "
                         f"embeddings, norms and biases in {s.dtype}")
        else:
            weights = (total - head) * w
        weights += lora_params * 4 + head * w
        largest = max([s.lora_r * max(lin[t][0], lin[t][1]) for t in s.target_modules] + [head])
        total += lora_params
    gradients = sum(p * b for p, b in trainable_groups)
    optimizer = 8 * trainable
    master = sum(4 * p for p, b in trainable_groups if b < 4)
    if n > 1:
        weights, gradients, optimizer, master = weights / n, gradients / n, optimizer / n, master / n
        layer, root = shape.layer_params(), shape.embedding_params() + d + head + lm_head
        fsdp_gather = max(root, 2 * layer) * w + layer * w  # gathered unit(s) + one unit's unsharded grads
        notes.append(f"FSDP full sharding over {n} processes: weights, gradients and optimizer states / {n}, plus "
                     "the gathered decoder layer (and the prefetched next) and its unsharded gradients")
    else:
        fsdp_gather = 0.0
    ddp_buckets = gradients if (s.processes > 1 and not s.fsdp) else 0.0
    if ddp_buckets:
        notes.append(f"{s.processes} processes with DDP: every process holds the whole model (only full "
                     "fine-tuning is sharded); DDP's gradient buckets add one copy of the gradients")

    acts = activations(shape, s)
    tokens = s.max_length
    per_example = (acts.per_token + acts.workspace_per_token) * tokens + acts.per_example
    # qlora: bitsandbytes dequantises one weight matrix at a time into the compute dtype
    dequant = max(a * b for a, b, _ in lin.values()) * w if s.mode == "qlora" else 0.0
    # fused AdamW (training.optim) updates one parameter tensor at a time in place; the bound of one
    # fp32 temporary of the largest tensor also covers torch's for-loop fallback
    step_temporaries = 4 * largest
    backward_constant = acts.per_batch + acts.weight_copies + dequant + ddp_buckets
    if s.grad_accum > 1:
        backward_constant += gradients
    fixed = weights + optimizer + master + fsdp_gather
    step_phase = gradients + step_temporaries
    act_bytes = acts.saved(s.batch_size, tokens)
    workspace = acts.workspace(s.batch_size, tokens) + dequant
    backward = backward_constant + per_example * s.batch_size
    peak = fixed + max(backward, step_phase)
    if acts.weight_copies:
        notes.append(f"bf16 autocast over {s.dtype} weights: every matmul saves a bf16 copy of its weight for "
                     f"backward ({acts.weight_copies / GIB:.2f} GiB); loading the base in bf16 avoids it")
    reserve = GPU_RESERVE_GIB if s.device == "gpu" else 0.0
    plan = MemoryPlan(
        model=asdict(shape), settings=asdict(s), params_total=total, params_trainable=trainable,
        params_causal_lm=shape.causal_lm_params(), head_params=head, weights=weights, gradients=gradients,
        optimizer=optimizer, master=master, activations=act_bytes, workspace=workspace,
        weight_copies=acts.weight_copies, dequant=dequant, step_temporaries=step_temporaries,
        fsdp_gather=fsdp_gather, ddp_buckets=ddp_buckets, fixed=fixed, backward_constant=backward_constant,
        step_phase=step_phase, per_example=per_example, peak=peak,
        phase="backward" if backward >= step_phase else "optimizer step", reserve_gib=reserve, notes=notes)
    if s.gpu_memory_gib is not None:
        budget = (s.gpu_memory_gib - reserve) * GIB
        plan.memory_gib = s.gpu_memory_gib
        plan.fits = peak <= budget
        plan.fit_batch_size = fit_batch_size(fixed, backward_constant, step_phase, per_example, budget)
    return plan


# --- output ------------------------------------------------------------------------------------
def _size(nbytes: float) -> str:
    if nbytes >= GIB:
        return f"{nbytes / GIB:8.2f} GiB"
    return f"{nbytes / MIB:8.1f} MiB"


def format_table(plan: MemoryPlan) -> str:
    m, s = plan.model, plan.settings
    mode = {"lora": "LoRA", "full": "full fine-tuning", "qlora": "QLoRA (LoRA on an NF4 base)"}[s["mode"]]
    adapter = f", r {s['lora_r']} on {','.join(s['target_modules'])}" if s["mode"] != "full" else ""
    precision = s["precision"] if s["precision"] != "auto" else f"auto = {PlanSettings(**s).compute_precision}"
    kv = f"{m['num_heads']} heads / {m['num_kv_heads']} KV heads x {m['head_dim']}"
    lines = [
        f"memory plan: {m['source']} ({m['model_type']}, {m['num_layers']} layers, hidden {m['hidden_size']}, {kv}, "
        f"MLP {m['intermediate_size']}, vocab {m['vocab_size']:,})",
        f"  {mode}{adapter}; weights {s['dtype']}, compute {precision}; batch {s['batch_size']} x {s['max_length']} "
        f"tokens{' (padded)' if s['padded'] else ''}; activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}; "
        f"{s['processes']} process{'es' if s['processes'] > 1 else ''} on {s['device'].upper()}",
        f"  parameters: {plan.params_total:,} total, {plan.params_trainable:,} trainable "
        f"({100 * plan.params_trainable / plan.params_total:.3g} %); as a causal LM {plan.params_causal_lm:,}",
        "",
        "  per process                      memory",
    ]
    rows = [("weights", plan.weights), ("gradients", plan.gradients), ("optimizer (AdamW moments)", plan.optimizer),
            ("fp32 master weights", plan.master), ("activations (saved)", plan.activations),
            ("workspace (backward)", plan.workspace)]
    if plan.weight_copies:
        rows.append(("autocast weight copies", plan.weight_copies))
    rows.append(("optimizer step temporaries", plan.step_temporaries))
    if plan.fsdp_gather:
        rows.append(("FSDP gathered layers", plan.fsdp_gather))
    if plan.ddp_buckets:
        rows.append(("DDP gradient buckets", plan.ddp_buckets))
    lines += [f"  {name:30s} {_size(value)}" for name, value in rows]
    lines.append(f"  {'peak (estimate)':30s} {_size(plan.peak)}   (set by the {plan.phase})")
    lines.append(f"  {'per example (act. + workspace)':30s} {_size(plan.per_example)}")
    if plan.memory_gib is not None:
        where = "GPU" if s["device"] == "gpu" else "memory"
        reserve = f", {plan.reserve_gib:g} GiB of it kept for the CUDA context" if plan.reserve_gib else ""
        verdict = "fits" if plan.fits else "does NOT fit"
        fit = f"largest batch at {s['max_length']} tokens: {plan.fit_batch_size}"
        if not plan.fit_batch_size:
            fit += " (not even one example fits)"
        lines += ["", f"  {plan.memory_gib:g} GiB {where}{reserve}: batch {s['batch_size']} {verdict}; {fit}"]
    if plan.notes:
        lines += [""] + [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
