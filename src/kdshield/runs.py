"""Output directories that belong to one run's settings.

    run = RunDir("runs/lora", "finetune", settings, resume=args.resume, fresh=args.fresh).open()
    ...train into run.path, reusing what a killed run with the same settings left...
    run.finish(record)

``DIR/kdshield_run.json`` holds the command, its resolved settings and their hash. Opening a
directory that holds a run:

| what is there                           | no flag      | --resume           | --fresh         |
|-----------------------------------------|--------------|--------------------|-----------------|
| nothing                                 | start        | start              | start           |
| same settings, unfinished               | error        | continue           | start afresh    |
| same settings, finished                 | error        | reuse (evaluate)   | start afresh    |
| other settings, or unknown (no manifest)| error        | error              | start afresh    |

An error names the settings that differ and the way out before any work starts, so a finished run
is never overwritten and a record never claims settings that did not run. ``--fresh`` clears the
directory's run outputs; its results file (``results.jsonl``) is append-only and always kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdshield.errors import ConfigError, RunStateError
from kdshield.results import canonical_json, settings_diff, settings_hash

log = logging.getLogger(__name__)

MANIFEST = "kdshield_run.json"
KEPT_BY_FRESH = ("results.jsonl", "results.jsonl.corrupt")


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a directory this process can write into, created if needed; ConfigError before any
    work when it is a file, lies under a file, or is not writable (probed with a temporary file that
    is removed again; nothing already in the directory is touched)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is an existing file, not a directory; pass a directory path "
                          "(a new one, or an earlier run's directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{what} {out}: cannot create the directory ({err.strerror or err}); pass a "
                          "directory path that is writable and not under an existing file") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".kdshield-write-test-", dir=out)
    except OSError as err:
        raise ConfigError(f"{what} {out} is not writable ({err.strerror or err}); fix its permissions or "
                          "pass another directory") from None
    os.close(fd)
    os.unlink(probe)
    return out


@dataclass
class RunDir:
    path: Path
    command: str
    settings: dict
    resume: bool = False
    fresh: bool = False
    previous: dict | None = field(default=None, init=False)  # the manifest found on open

    def __post_init__(self):
        self.path = Path(self.path)
        self.settings = json.loads(canonical_json(self.settings))  # as it will read back

    @property
    def hash(self) -> str:
        return settings_hash(self.settings)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def reused(self) -> bool:
        """True when a finished run with these settings is being reused (--resume)."""
        return bool(self.previous and self.previous.get("finished"))

    @property
    def prior_wall_s(self) -> float:
        return float((self.previous or {}).get("wall_s") or 0.0)

    def _outputs(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name not in (MANIFEST, *KEPT_BY_FRESH)]

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise RunStateError(f"{self.manifest_path} is damaged ({err}); rerun with --fresh to replace the run "
                                "in that directory, or use another output directory") from err

    def open(self) -> RunDir:
        """Check the directory against this run's settings (see the module table), then claim it."""
        check_output_dir(self.path)
        found = self._read_manifest()
        if self.fresh:
            for p in self._outputs():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.manifest_path.unlink(missing_ok=True)
            if found is not None or self._outputs():
                log.info("%s: --fresh: earlier run outputs removed (results.jsonl kept)", self.path)
            found = None
        elif found is None:
            if self._outputs():
                names = ", ".join(sorted(p.name for p in self._outputs())[:5])
                raise RunStateError(f"{self.path} already holds files ({names}) of a run whose settings are unknown "
                                    "(no kdshield_run.json: an older kdshield or another program wrote them); use "
                                    "another output directory, or rerun with --fresh to replace them")
        else:
            same = found.get("settings_hash") == self.hash and found.get("command") == self.command
            if not same:
                what = (settings_diff(found.get("settings"), self.settings)
                        if found.get("command") == self.command else
                        f"it holds a {found.get('command')!r} run, this is {self.command!r}")
                raise RunStateError(f"{self.path} holds a run with other settings ({what}); use another output "
                                    "directory, or rerun with --fresh to replace it")
            state = "finished" if found.get("finished") else "unfinished (killed?)"
            if not self.resume:
                how = "--resume reuses it (and evaluates it again)" if found.get("finished") else \
                    "--resume continues it"
                raise RunStateError(f"{self.path} already holds a {state} run with these settings: {how}; "
                                    "--fresh starts it again; or use another output directory")
            log.info("%s: %s run with the same settings: %s", self.path, state,
                     "reusing it" if found.get("finished") else "continuing it")
        self.previous = found
        self._write(finished=bool(found and found.get("finished")), wall_s=self.prior_wall_s)
        self._started = time.perf_counter()
        return self

    def _write(self, **fields) -> None:
        manifest = {"command": self.command, "settings_hash": self.hash, "settings": self.settings, **fields}
        tmp = self.manifest_path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.manifest_path)

    def elapsed_s(self) -> float:
        """Wall time of this run so far, earlier (killed) processes included as far as they were
        recorded; a reused finished run reports the time it took to make."""
        if self.reused:
            return self.prior_wall_s
        return self.prior_wall_s + time.perf_counter() - self._started

    def finish(self, wall_s: float | None = None, **fields) -> None:
        """Mark the run finished (a later open with the same settings and --resume reuses it)."""
        self._write(finished=True, wall_s=self.elapsed_s() if wall_s is None else wall_s, **fields)
