"""The training loop: learns, is seeded, resumes exactly, accumulates, selects the best epoch."""

from __future__ import annotations

import pytest
import torch

from kdshield.data.batching import epoch_batches
from kdshield.errors import ConfigError
from kdshield.evaluation import accuracy
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.training.loop import TrainConfig, train


def _model(path, kind="lora"):
    torch.manual_seed(0)
    clf = load_classifier(path, num_labels=2)
    attach_adapter(clf, AdapterConfig(kind=kind, r=4))
    return clf


def _weights(clf):
    return {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}


def test_training_learns_toy_task(tiny_bert_dir, toy_dataset):
    data, test = toy_dataset(96, 0), toy_dataset(64, 1)
    clf = _model(tiny_bert_dir, "full")
    before = accuracy(predict(clf, test["text"]).probs, test["label"])
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=16, precision="fp32", warmup_ratio=0.0)
    res = train(clf, data, cfg)
    after = accuracy(predict(clf, test["text"]).probs, test["label"])
    assert after > max(0.85, before + 0.2), (before, after)
    assert res.steps == 4 * 6 and res.examples_seen == 4 * 96


def test_same_seed_same_weights_and_batches(tiny_llama_dir, toy_dataset):
    data = toy_dataset(48)
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=8, precision="fp32")
    a, b = _model(tiny_llama_dir), _model(tiny_llama_dir)
    train(a, data, cfg)
    train(b, data, cfg)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    lengths = [3, 1, 4, 1, 5, 9, 2, 6] * 5
    assert epoch_batches(lengths, 4, 0, 0) == epoch_batches(lengths, 4, 0, 0)
    assert epoch_batches(lengths, 4, 0, 0) != epoch_batches(lengths, 4, 0, 1)
    flat = sorted(i for b in epoch_batches(lengths, 4, 0, 3) for i in b)
    assert flat == list(range(len(lengths)))


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_continues_to_identical_result(tiny_bert_dir, toy_dataset, tmp_path, ema):
    """A run stopped after a checkpoint and resumed equals the uninterrupted run (dropout on), weight
    average included."""
    data = toy_dataset(80)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=8, precision="fp32", checkpoint_every=3, checkpoint_min_s=0, ema=ema)
    ref = _model(tiny_bert_dir)
    train(ref, data, cfg, output_dir=tmp_path / "ref")

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dying_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 14:  # mid second epoch, after the checkpoint at step 12
            raise Killed
        from kdshield.training.loop import ce_loss
        return ce_loss(model, batch)

    victim = _model(tiny_bert_dir)
    with pytest.raises(Killed):
        train(victim, data, cfg, loss_fn=dying_loss, output_dir=tmp_path / "run")
    fresh = _model(tiny_bert_dir)  # a new process: nothing survives but the checkpoint
    res = train(fresh, data, cfg, output_dir=tmp_path / "run", resume=True)
    assert res.resumed_from_step == 12
    wr, wf = _weights(ref), _weights(fresh)
    for n in wr:
        assert torch.allclose(wr[n], wf[n], atol=1e-6), n


def test_grad_accumulation_counts_steps(tiny_llama_dir, toy_dataset):
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum=3, precision="fp32")
    res = train(_model(tiny_llama_dir), toy_dataset(40), cfg)
    assert res.steps == 4  # 10 batches -> steps after 3, 6, 9 and the last one


def test_select_best_restores_best_eval(tiny_llama_dir, toy_dataset):
    scores = iter([0.9, 0.1, 0.2])
    snapshots = []

    def eval_fn(model):
        snapshots.append(_weights(model))
        return {"score": next(scores)}

    clf = _model(tiny_llama_dir)
    res = train(clf, toy_dataset(32), TrainConfig(epochs=3, lr=1e-2, batch_size=8, precision="fp32"),
                eval_fn=eval_fn)
    assert res.best_score == 0.9 and res.best_step == 4
    final = _weights(clf)
    assert all(torch.equal(final[n], snapshots[0][n]) for n in final)


def test_ema_returns_the_moving_average_of_the_steps(tiny_llama_dir, toy_dataset, tmp_path):
    from kdshield.training.loop import ce_loss, load_trained_weights

    seen = []  # the weights each step starts from: the initial ones, then after steps 1, 2, ...

    def spy_loss(model, batch):
        seen.append(_weights(model))
        return ce_loss(model, batch)

    evaluated = []
    clf = _model(tiny_llama_dir)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8, precision="fp32", select_best=False, ema=0.5,
                      warmup_ratio=0.0)
    res = train(clf, toy_dataset(32), cfg, loss_fn=spy_loss, output_dir=tmp_path / "run",
                eval_fn=lambda m: evaluated.append(_weights(m)) or {"score": 0.5})
    assert res.steps == 8 and len(seen) == 8
    raw = _model(tiny_llama_dir)
    load_trained_weights(raw, tmp_path / "run", "last")
    steps = seen[1:] + [_weights(raw)]  # the weights after steps 1..8
    expected = {n: v.float().clone() for n, v in seen[0].items()}
    for k, w in enumerate(steps, start=1):
        d = min(0.5, (1 + k) / (10 + k))
        for n in expected:
            expected[n] = d * expected[n] + (1 - d) * w[n].float()
    final = _weights(clf)
    for n in final:
        assert torch.allclose(final[n], expected[n], atol=1e-6), n
        assert torch.equal(evaluated[-1][n], final[n])  # the evaluation saw the average
    assert any(not torch.equal(final[n], steps[-1][n]) for n in final)  # and it is not the last step
    again = _model(tiny_llama_dir)
    load_trained_weights(again, tmp_path / "run", "best")  # what train returned
    assert all(torch.allclose(_weights(again)[n], final[n]) for n in final)
    with pytest.raises(ConfigError, match="train.ema"):
        TrainConfig(ema=1.0)


def test_stop_fn_ends_early(tiny_llama_dir, toy_dataset):
    res = train(_model(tiny_llama_dir), toy_dataset(32), TrainConfig(epochs=5, batch_size=8, precision="fp32"),
                eval_fn=lambda m: {"score": 1.0}, stop_fn=lambda metrics: True)
    assert res.stopped_early and res.steps == 4


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("epochs", 0), ("batch_size", 0), ("precision", "fp8"),
                                         ("warmup_ratio", 1.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def _ddp_worker(path, tmp):
    from accelerate import PartialState

    clf = _model(path)
    from datasets import Dataset

    from tests.conftest import make_sentiment_texts
    texts, labels = make_sentiment_texts(32)
    res = train(clf, Dataset.from_dict({"text": texts, "label": labels}),
                TrainConfig(epochs=1, batch_size=4, precision="fp32"), output_dir=tmp)
    state = PartialState()
    assert state.num_processes == 2
    assert res.steps == 4  # 8 batches shared by 2 processes
    # the processes hold identical weights after synchronised steps
    w = torch.cat([p.detach().flatten() for p in clf.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(w) for _ in range(2)]
    torch.distributed.all_gather(gathered, w)
    assert torch.allclose(gathered[0], gathered[1])


def run_two_process(path: str, tmp: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(_ddp_worker, args=(path, tmp), num_processes=2)


def test_two_process_path_on_cpu(tiny_llama_dir, tmp_path):
    """Two DDP processes on CPU (gloo). In a fresh interpreter: forking a process whose OpenMP
    threads already ran (as pytest's has, after other tests) can deadlock the children."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = f"from tests.test_training import run_two_process; run_two_process({str(tiny_llama_dir)!r}, {str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_load_trained_weights_restores_the_selected_run(tiny_llama_dir, toy_dataset, tmp_path):
    from kdshield.training.loop import load_trained_weights

    scores = iter([0.9, 0.1])
    clf = _model(tiny_llama_dir)
    train(clf, toy_dataset(32), TrainConfig(epochs=2, lr=1e-2, batch_size=8, precision="fp32"),
          eval_fn=lambda m: {"score": next(scores)}, output_dir=tmp_path / "run")
    fresh = _model(tiny_llama_dir)
    assert any(not torch.equal(p, _weights(clf)[n]) for n, p in _weights(fresh).items())
    path = load_trained_weights(fresh, tmp_path / "run")
    assert path.endswith("best.safetensors")
    assert all(torch.equal(p, _weights(clf)[n]) for n, p in _weights(fresh).items())  # the epoch-1 weights
    last = _model(tiny_llama_dir)
    load_trained_weights(last, tmp_path / "run", which="last")
    assert any(not torch.equal(p, _weights(clf)[n]) for n, p in _weights(last).items())
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        load_trained_weights(_model(tiny_llama_dir), tmp_path / "nothing")
    with pytest.raises(ValueError, match="which"):
        load_trained_weights(fresh, tmp_path / "run", which="first")


def test_a_restart_for_more_threads_checkpoints_and_resumes_to_the_same_weights(tiny_bert_dir, toy_dataset,
                                                                              tmp_path, monkeypatch):
    """A grid worker offered more threads (kdshield.threads) stops between optimizer steps with a
    checkpoint of the weights as they are, without waiting for the next checkpoint_every; the
    training resumed from it ends where the uninterrupted one ends."""
    from kdshield import threads

    data = toy_dataset(80)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=8, precision="fp32", checkpoint_every=50, checkpoint_min_s=0)
    ref = _model(tiny_bert_dir)
    train(ref, data, cfg, output_dir=tmp_path / "ref")

    class Budget:
        value = 1

    budget = Budget()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process keeps its threads
    monkeypatch.setattr(threads, "_budget", None)  # restored after the test: no later test sees it
    monkeypatch.setattr(threads, "_started_with", 0)
    threads.attach(budget, 1)
    calls = {"n": 0}

    def offering_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 13:  # mid second epoch, long before a checkpoint_every checkpoint
            budget.value = 2
        from kdshield.training.loop import ce_loss
        return ce_loss(model, batch)

    with pytest.raises(threads.Restart):
        train(_model(tiny_bert_dir), data, cfg, loss_fn=offering_loss, output_dir=tmp_path / "run")
    monkeypatch.setattr(threads, "_budget", None)  # the fresh process at the new count
    fresh = _model(tiny_bert_dir)
    res = train(fresh, data, cfg, output_dir=tmp_path / "run", resume=True)
    assert res.resumed_from_step == 13
    wr, wf = _weights(ref), _weights(fresh)
    for n in wr:
        assert torch.allclose(wr[n], wf[n], atol=1e-6), n
