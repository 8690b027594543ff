"""RAP embedding step: plain (OpenBackdoor) vs normalized, on the Rotten Tomatoes BadNet victim of bench_embedded.py.

    python benchmarks/rap_step.py POISONED_DIR LORA_RUN_DIR 0.05 0.2   # normalized steps with these lr values

Reuses the plain-LoRA victim that ``bench_embedded.py --attacks badnet --methods lora`` trained (run that
first; POISONED_DIR is the run_dir of the badnet ``none`` record without /model, LORA_RUN_DIR the
run_dir of the poisoned ``lora`` record); the plain-step row (lr 0.01) is the ``rap`` record in benchmarks/tuning/embedded.jsonl (the plain
step is no longer the default).
"""
import logging
import sys
from pathlib import Path

from kdshield.attacks.config import AttackConfig
from kdshield.data import load_task
from kdshield.defenses import DEFENSES, DefenseContext
from kdshield.defenses.rap import RapConfig
from kdshield.models.adapters import AdapterConfig
from kdshield.training.loop import TrainConfig

logging.basicConfig(level=logging.INFO)
task = load_task("rotten-tomatoes", seed=0, n_proxy=2000, n_train=2000, n_dev=300, n_test=1000, max_chars=1000)
pdir, lora_dir = Path(sys.argv[1]), Path(sys.argv[2])
ctx = DefenseContext(student=str(pdir / "model"), task=task, output_dir=Path("/tmp/exp/rap"), victim_dir=lora_dir / "train",
                     train=TrainConfig(epochs=2, lr=2e-4, batch_size=16, max_length=64, seed=0), adapter=AdapterConfig(kind="lora", r=8),
                     attack=AttackConfig(attack="badnet"))
for lr in map(float, sys.argv[3:]):
    res = DEFENSES.get("rap")().run(ctx, RapConfig(step="normalized", lr=lr))
    d = res.detection
    print("RESULT", lr, d["far"], d["frr"], d.get("threshold"), flush=True)
