"""Sharded full fine-tuning (FSDP2 through accelerate) on CPU: 2 gloo processes with the settings
of configs/accelerate/fsdp.yaml train, evaluate, save and resume a full model of the tiny Llama
(a classifier and a generator) and the W2SDefense teacher, and end at the weights of a single-process
run; the teacher cache is written by the main process and read by the other.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_fsdp.py

accelerate turns FSDP on only for GPU process groups (on a CPU-only group it stays MULTI_CPU), so
the worker reads the launch config as ``accelerate launch`` does (the FSDP_* environment of
``prepare_multi_gpu_env``) and then marks the group FSDP itself (``_force_fsdp``); everything after
that is accelerate's own FSDP2 preparation (``fully_shard`` on the decoder layers and the root)
and kdshield's loop. What equality is achievable: FSDP over 2 processes with batch b per process
averages the two batches' gradients per step, which is what one process does with batch b and
grad_accum 2 over the same batch order (the loop deals batch i to process i mod 2). The tiny Llama
has no dropout, so the runs differ only by float summation order (checked to 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
TOL = 1e-5


def fsdp_env(config: Path = CONFIG, num_processes: int = 2) -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* environment ``accelerate launch --config_file config`` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes",
                                               str(num_processes), "unused.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def _force_fsdp(env: dict[str, str]) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(env)
    Accelerator(cpu=True)  # the process group (gloo)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as accelerate launch gives it
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def _cfg(**kw):
    from kdshield.training.loop import TrainConfig

    base = dict(epochs=2, lr=1e-3, batch_size=4, precision="fp32", warmup_ratio=0.0, max_length=32,
                checkpoint_min_s=0, activation_checkpointing="off")
    return TrainConfig(**{**base, **kw})


def _classifier(path):
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier

    torch.manual_seed(0)
    clf = load_classifier(path, num_labels=2)
    return attach_adapter(clf, AdapterConfig(kind="full"))


def _data(n: int, seed: int):
    from datasets import Dataset

    from tests.conftest import make_sentiment_texts

    texts, labels = make_sentiment_texts(n, seed)
    return Dataset.from_dict({"text": texts, "label": labels})


def _dev_score(dev):
    """Minus the dev cross-entropy: continuous, so the best epoch is not decided by a tie."""
    from kdshield.inference import predict

    def evaluate(clf) -> dict:
        probs = torch.from_numpy(predict(clf, dev["text"], max_length=32).probs)
        nll = -torch.log(probs[torch.arange(len(dev)), torch.tensor(dev["label"])]).mean()
        return {"score": -float(nll)}

    return evaluate


def _gen_data():
    from tests.gen_fixtures import sft_data

    return sft_data(n_train=32, n_dev=8, seed=0)


SEEN_IN_TRAINING: list[tuple[str, bool]] = []  # (model class, whether its weights are DTensors) per step


def _recording_ce_loss(model, batch):
    from torch.distributed.tensor import DTensor

    from kdshield.training.loop import ce_loss

    SEEN_IN_TRAINING.append((type(model).__name__, all(isinstance(p, DTensor) for p in model.parameters())))
    return ce_loss(model, batch)


def train_classifier(path, out: Path, grad_accum: int = 1, resume: bool = False):
    from kdshield.training.loop import train

    clf = _classifier(path)
    res = train(clf, _data(32, 0), _cfg(grad_accum=grad_accum), eval_fn=_dev_score(_data(16, 1)),
                output_dir=out, resume=resume, keep_optimizer=True, loss_fn=_recording_ce_loss)
    return clf, res


def train_generator(path, out: Path, grad_accum: int = 1):
    from kdshield.models.adapters import AdapterConfig
    from kdshield.training.sft import sft_finetune

    return sft_finetune(str(path), _gen_data(), AdapterConfig(kind="full"), _cfg(grad_accum=grad_accum, lr=3e-3),
                        output_dir=out)


def _teacher(bert_path: str, cache: Path):
    """The W2SDefense teacher (the tiny BERT, full fine-tuning under the same FSDP launch)."""
    from kdshield.data import TaskData
    from kdshield.defenses.w2s import W2SConfig, prepare_teacher
    from kdshield.training.loop import TrainConfig

    task = TaskData(name="toy", label_names=["negative", "positive"], source="test",
                    splits={"train": _data(32, 3), "dev": _data(16, 4)})
    return prepare_teacher(W2SConfig(teacher=bert_path, teacher_epochs=1), task, 32, TrainConfig(precision="fp32"),
                           cache_root=cache)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_everywhere(t: torch.Tensor) -> bool:
    both = [torch.zeros_like(t) for _ in range(2)]
    torch.distributed.all_gather(both, t.contiguous())
    return torch.equal(both[0], both[1])


def _worker(path: str, bert_path: str, tmp: str, env: dict) -> None:
    """One of the two FSDP processes: train, evaluate, save, resume; rank 0 writes what it saw."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from kdshield.inference import predict

    _force_fsdp(env)
    tmp = Path(tmp)
    rank = torch.distributed.get_rank()
    clf, res = train_classifier(path, tmp / "clf-run")
    # the loop trained FSDP2's sharded module (every weight a DTensor shard), not the caller's
    assert len(SEEN_IN_TRAINING) == 8 and all(name == "FSDPClassifier" and shards for name, shards in SEEN_IN_TRAINING)
    params = list(clf.parameters())
    assert params and not any(isinstance(p, DTensor) for p in params)  # the caller's module: full weights
    assert _same_everywhere(torch.cat([p.detach().flatten() for p in params]))  # the same full model everywhere
    probs = predict(clf, _data(16, 2)["text"], max_length=32).probs  # evaluation on one process's own
    again, reused = train_classifier(path, tmp / "clf-run", resume=True)  # a finished run, reused
    gen, gen_res = train_generator(path, tmp / "gen-run")
    # the teacher cache: trained by both processes, its outputs computed and written by the main one
    # and read by the other; a second call reuses the entry on both
    teacher = _teacher(bert_path, tmp / "teachers")
    assert teacher.trained and _same_everywhere(teacher.logits) and _same_everywhere(teacher.features)
    cached = _teacher(bert_path, tmp / "teachers")
    assert not cached.trained and torch.equal(cached.logits, teacher.logits)
    if rank == 0:
        clf.save(tmp / "clf-model")
        gen.save(tmp / "gen-model")
        save_file({n: t.contiguous() for n, t in _weights(clf).items()}, str(tmp / "clf.safetensors"))
        save_file({n: t.contiguous() for n, t in _weights(again).items()}, str(tmp / "clf-again.safetensors"))
        save_file({n: t.contiguous() for n, t in _weights(gen).items()}, str(tmp / "gen.safetensors"))
        (tmp / "fsdp.json").write_text(json.dumps({
            "steps": res.steps, "history": res.history, "best_step": res.best_step, "probs": probs.tolist(),
            "reused_from": reused.resumed_from_step, "gen_steps": gen_res.steps, "gen_history": gen_res.history,
            "teacher_files": sorted(p.name for p in teacher.path.iterdir())}))


def run_fsdp(path: str, bert_path: str, tmp: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(_worker, args=(path, bert_path, tmp, fsdp_env()), num_processes=2)


@pytest.fixture(scope="module")
def fsdp_run(tiny_llama_dir, tiny_bert_dir, tmp_path_factory) -> Path:
    """The two-process FSDP run, in a fresh interpreter (forking a process whose OpenMP threads
    already ran, as pytest's has, can deadlock the children)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    code = (f"from tests.test_fsdp import run_fsdp; "
            f"run_fsdp({str(tiny_llama_dir)!r}, {str(tiny_bert_dir)!r}, {str(tmp)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        assert torch.allclose(a[n], b[n], atol=TOL, rtol=TOL), (n, float((a[n] - b[n]).abs().max()))


def test_fsdp_config_is_version_2_with_full_state_dicts():
    env = fsdp_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp_classifier_equals_single_process_with_the_same_global_batch(fsdp_run, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from kdshield.inference import predict
    from kdshield.models.classifier import load_classifier

    seen = json.loads((fsdp_run / "fsdp.json").read_text())
    ref, ref_res = train_classifier(tiny_llama_dir, tmp_path / "ref", grad_accum=2)
    assert seen["steps"] == ref_res.steps == 8  # 2 epochs x 8 batches of 4, two per step
    assert seen["best_step"] == ref_res.best_step
    for a, b in zip(seen["history"], ref_res.history):  # the evaluations during training agree
        assert a["step"] == b["step"] and abs(a["score"] - b["score"]) < 1e-4
    fsdp = load_file(str(fsdp_run / "clf.safetensors"))
    _close(fsdp, _weights(ref))
    start = _weights(_classifier(tiny_llama_dir))
    assert max(float((fsdp[n] - start[n]).abs().max()) for n in start) > 2e-3  # it trained (100x TOL)
    # the saved model is the full trained one; the finished run's checkpoint resumes to it
    saved = load_classifier(fsdp_run / "clf-model")
    _close(_weights(saved), fsdp)
    _close(load_file(str(fsdp_run / "clf-again.safetensors")), fsdp)
    assert seen["reused_from"] == 8
    probs = predict(ref, _data(16, 2)["text"], max_length=32).probs
    assert torch.allclose(torch.tensor(seen["probs"]), torch.from_numpy(probs), atol=1e-4)


def test_fsdp_teacher_cache_written_once_and_shared(fsdp_run):
    files = json.loads((fsdp_run / "fsdp.json").read_text())["teacher_files"]
    assert {"model", "teacher.json", "train_outputs.safetensors"} <= set(files)


def test_fsdp_generator_full_sft_equals_single_process(fsdp_run, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from kdshield.models.generator import load_generator

    seen = json.loads((fsdp_run / "fsdp.json").read_text())
    gen, res = train_generator(tiny_llama_dir, tmp_path / "ref", grad_accum=2)
    assert seen["gen_steps"] == res.steps
    fsdp = load_file(str(fsdp_run / "gen.safetensors"))
    _close(fsdp, _weights(gen))
    _close(_weights(load_generator(fsdp_run / "gen-model")), fsdp)
