"""``kdshield plan``: the memory one training process needs, by arithmetic, before anything runs.

    kdshield plan --model smollm2-135m                              # LoRA, kdshield's defaults
    kdshield plan --model tests/fixtures/llama3-8b-config.json --mode qlora --gpu-memory 24
    kdshield plan --model path/to/config.json --mode full --dtype bf16 --processes 8 --gpu-memory 80 --json

Reads only the model's config.json (a builtin name, a model directory, a config.json, or a hub id
already in the local Hugging Face cache); never loads weights, never downloads. Prints, per
process, parameters (total, trainable) and the memory of weights, gradients, optimizer states,
activations and workspace, the estimated peak, and with --gpu-memory whether the batch fits and the
largest batch that does. The formulas are in kdshield/plan.py's docstring.
"""

from __future__ import annotations

import argparse
import json

from kdshield.plan import (
    DEVICES,
    DTYPES,
    MODES,
    PRECISIONS,
    TASKS,
    PlanSettings,
    model_shape,
    plan_memory,
)
from kdshield.training.memory import AUTO_MIN_PARAMS, CHECKPOINTING


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="memory plan of a training run (per process), from config.json only",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="REF",
                        help="builtin name, model directory, config.json, or a hub id in the local HF cache")
    parser.add_argument("--mode", default="lora", choices=MODES,
                        help="lora (frozen base + adapters), full (all weights: weight poisoning, full-model "
                             "defenses) or qlora (LoRA on a 4-bit NF4 base: the commands' --quantize 4bit)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the base weights, as the training commands' --dtype: auto = bf16 on a GPU "
                             "(assumed to have bf16) or a CPU with native bf16, else fp32; fp32 for --mode full "
                             "(kdshield trains every weight in fp32); qlora's non-quantised weights in bf16")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="TrainConfig.precision: bf16 autocast or fp32 (auto: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--device", default="gpu", choices=DEVICES,
                        help="where it runs: gpu keeps GPU_RESERVE_GIB for the CUDA context")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass, per process")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (batches padded to it)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--target-modules", default="q_proj,v_proj", metavar="LIST",
                        help="LoRA target modules, comma list (or all-linear)")
    parser.add_argument("--activation-checkpointing", default="auto", choices=list(CHECKPOINTING),
                        help="keep only each layer's input and recompute it in backward, as "
                             "--train.activation-checkpointing: auto = on from "
                             f"{AUTO_MIN_PARAMS / 1e9:g}B parameters")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes (GPUs); full fine-tuning is sharded over them (FSDP), LoRA replicated (DDP)")
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--num-labels", type=int, default=2, help="classes of the classification head")
    parser.add_argument("--task", default="classify", choices=TASKS,
                        help="classify (kdshield's classifier: no LM head, no vocabulary logits) or causal-lm")
    parser.add_argument("--no-padding", action="store_true",
                        help="batches without padding (no mask: SDPA reads the KV heads without repeating them)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="memory of one GPU (or of the machine with --device cpu), GiB: does it fit, and the "
                             "largest batch that does")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, and GiB under 'gib')")
    parser.set_defaults(func=run)


def plan_dtype(mode: str, dtype: str, device: str) -> str | None:
    """The weights' dtype ``--dtype`` stands for, resolved as the training commands resolve it
    (``LoadOptions``): full fine-tuning loads fp32, qlora's bf16 (None: PlanSettings' default)."""
    if dtype != "auto":
        return dtype
    if mode != "lora":
        return None
    if device == "gpu":
        return "bf16"
    from kdshield.inference import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def run(args: argparse.Namespace) -> int:
    shape = model_shape(args.model)
    params = shape.causal_lm_params() if args.task == "causal-lm" else shape.backbone_params()
    checkpointing = args.activation_checkpointing == "on" or (
        args.activation_checkpointing == "auto" and params >= AUTO_MIN_PARAMS)
    settings = PlanSettings(
        mode=args.mode, dtype=plan_dtype(args.mode, args.dtype, args.device), precision=args.precision,
        device=args.device, batch_size=args.batch_size,
        max_length=args.max_length, lora_r=args.lora_r,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        activation_checkpointing=checkpointing, processes=args.processes,
        grad_accum=args.grad_accum, num_labels=args.num_labels, task=args.task, padded=not args.no_padding,
        gpu_memory_gib=args.gpu_memory)
    plan = plan_memory(shape, settings)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0
