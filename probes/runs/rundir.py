"""One run per output directory: a lock, a fingerprint of everything that determines the numbers, and the same
rerun rules for every command that writes a directory.

Every job wraps its work in ``with run_directory(out, fingerprint, ...) as run:`` and ends with
``run.finish(record, summary)``. At the start the directory is locked (an OS lock on the directory itself, so
nothing is written into it to take the lock and a killed process leaves no stale lock) and ``run.json`` records
the fingerprint and ``status: running``. A rerun then

- with the same fingerprint, unfinished: resumes (the job's resumable stores skip what is done);
- with the same fingerprint, finished: prints the finished run's summary and exits 0 without recomputing
  (``recompute=True`` starts over);
- with another fingerprint: stops with exit 2 naming each differing setting (old -> new) and touches nothing;
  ``overwrite=True`` empties the directory first, so files of two runs never lie side by side.

The fingerprint is cheap to build at every start: model weights are identified by each file's size and
modification time (GGUF files by their sha256, which the conversion cache computes anyway), prompt files by the
sha256 of their content.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

from bridgeprobe.probes.runs import distributed
from bridgeprobe.probes.io.results import RESUMED_RUNS, atomic_write_json

RUN_JSON = "run.json"
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


class RunDirError(ValueError):
    """The output directory cannot take this run (in use, another run's, not a directory); exit 2."""


class RunComplete(Exception):
    """The directory already holds this run, finished: the message is its summary (exit 0, nothing recomputed)."""


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, computed once per process for each (path, size, mtime)."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def model_identity(spec: str) -> dict[str, Any]:
    """What identifies the weights ``spec`` names, cheaply: a GGUF file's sha256; a checkpoint directory's weight,
    config and tokenizer files by size and modification time; a hub name with the revision cached locally."""
    from bridgeprobe.probes.model.load import EMBEDDED, ModelLoadError, check_checkpoint

    if spec in EMBEDDED:
        return {"embedded": spec, "gguf_sha256": file_sha256(EMBEDDED[spec].locate())}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return {"gguf_sha256": file_sha256(path)}
    if path.is_dir():
        check_checkpoint(path)
        files = sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern) if f.is_file()})
        return {"directory": str(path.resolve()),
                "files": {f.name: f"{f.stat().st_size} bytes, mtime {f.stat().st_mtime_ns}" for f in files}}
    return {"hub": spec, "revision": _hub_revision(spec)}


def adapter_identity(directory: str) -> dict[str, Any]:
    """What identifies a peft adapter: its directory and the sha256 of its weights and config (adapters are small:
    ~10 MB for LoRA r 8 on a 135M model), so a retrained adapter in the same directory is another run."""
    path = Path(directory).expanduser()
    return {"directory": str(path.resolve()),
            **{name: file_sha256(path / name) for name in ("adapter_config.json", "adapter_model.safetensors")}}


def model_location(spec: str) -> str:
    """Where ``spec`` points, as a run records it: a local checkpoint directory or GGUF file as its absolute,
    resolved path (a relative name read from another directory would point elsewhere); an embedded alias or a hub
    name as given."""
    from bridgeprobe.probes.model.load import EMBEDDED

    path = Path(spec).expanduser()
    if spec not in EMBEDDED and (path.suffix == ".gguf" or path.is_dir()):
        return str(path.resolve())
    return spec


def read_run_record(path: Path, fix: str = "delete it, or rerun that run with --overwrite") -> dict[str, Any]:
    """The JSON object in a run.json, or a one-line :class:`RunDirError` naming the file and ``fix`` when it is
    damaged or holds no JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is damaged ({err}); {fix}") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{path} is damaged (a JSON {type(record).__name__}, not an object); {fix}")
    return record


def _hub_revision(name: str) -> str | None:
    """The commit the local hub cache resolves ``name``'s main branch to (None if not cached)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def prompt_identity(entries: list[str] | None) -> list[str] | None:
    """``NAME sha256=...`` for each prompt file (bundled sets by their file): the content, not the path."""
    if not entries:
        return None
    from bridgeprobe.prompts.loaders import BUNDLED, bundled_path
    from bridgeprobe.prompts.schema import PromptSetError

    found = []
    for entry in entries:
        path = bundled_path(entry) if entry in BUNDLED else Path(entry)
        if not path.is_file():
            raise PromptSetError(str(path), None, None, "file not found")
        found.append(f"{path.name} sha256={file_sha256(path)}")
    return found


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level, with dotted names (``train.n_layer``)."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flat_settings(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``setting: old -> new`` for each setting that differs (nested settings as dotted names)."""
    old_flat, new_flat = flat_settings(old), flat_settings(new)
    missing = object()
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if before != after:
            lines.append(f"{key}: {_show(before, missing)} -> {_show(after, missing)}")
    return lines


def _show(value: Any, missing: object) -> str:
    """A setting's value for a message: JSON, with long hashes cut to their first 12 digits."""
    if value is missing:
        return "(unset)"
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{20,}\b", r"\1…", json.dumps(value, ensure_ascii=False))


def normalize(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from run.json (JSON types only)."""
    return json.loads(json.dumps(fingerprint, default=str))


class RunDirectory:
    """The locked output directory of one run (see the module docstring); use :func:`run_directory`."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], *, overwrite: bool = False,
                 recompute: bool = False) -> None:
        self.out = Path(out)
        self.fingerprint = normalize(fingerprint)
        self.overwrite, self.recompute = overwrite, recompute
        self.resumed = False
        self._created = not self.out.exists()
        self._fd: int | None = None

    # ------------------------------------------------------------------ entering: lock, compare, record
    def __enter__(self) -> "RunDirectory":
        shards = distributed.context()
        if shards.active:  # rank 0 decides and prepares; the other processes follow its decision
            outcome = self._prepare_reporting() if shards.is_main else None
            outcome = shards.all_gather(outcome)[0]
            if outcome[0] != "ok":
                self._release()
                raise (RunComplete if outcome[0] == "complete" else RunDirError)(outcome[1])
            self.resumed = outcome[1]
            return self
        try:
            self._prepare()
        except BaseException:
            self._release()
            raise
        return self

    def _prepare_reporting(self) -> tuple[str, Any]:
        try:
            self._prepare()
        except RunComplete as done:
            return ("complete", str(done))
        except (RunDirError, OSError) as err:
            return ("error", str(err))
        return ("ok", self.resumed)

    def _prepare(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunDirError(f"{out} is a file, not a directory; choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot create the output directory {out}: {err.strerror}; choose another --out") from err
        if not os.access(out, os.W_OK | os.X_OK):
            raise RunDirError(f"the output directory {out} is not writable; choose another --out")
        self._lock()
        record = self._read_record()
        if record is None and any(out.iterdir()) and not _looks_like_a_run(out):
            raise RunDirError(f"{out} is not empty and holds no bridgeprobe run; choose a new or empty --out")
        if self.overwrite:
            self._empty()
        elif record is None:
            if any(out.iterdir()):
                raise RunDirError(f"{out} holds an interrupted run of an earlier bridgeprobe (no run.json); choose "
                                  "another --out, or pass --overwrite to replace it")
        else:
            old = record.get("fingerprint")
            if old is None:
                raise RunDirError(f"{out} holds a run of an earlier bridgeprobe without a fingerprint; choose "
                                  "another --out, or pass --overwrite to replace it")
            if old != self.fingerprint:
                changes = differences(old, self.fingerprint)
                raise RunDirError(f"{out} holds another run ({'; '.join(changes)}); nothing was changed. Rerun "
                                  "with its settings to resume it, choose another --out, or pass --overwrite "
                                  "to replace it")
            if record.get("status") == "finished":
                if not self.recompute:
                    summary = record.get("summary") or ""
                    raise RunComplete(f"{out}: this run is already finished with the same settings; nothing "
                                      "recomputed (--recompute runs it again)" + (f"\n{summary}" if summary else ""))
                self._empty()
            else:
                self.resumed = True
                RESUMED_RUNS.add(out.resolve())
                for stale in out.rglob(".*.tmp"):  # atomic writes cut short by the interruption
                    stale.unlink()
        atomic_write_json(out / RUN_JSON, {"command": self.fingerprint.get("command"), "status": "running",
                                           "pid": os.getpid(), "started": _now(), "fingerprint": self.fingerprint})

    def _lock(self) -> None:
        """An exclusive flock on the directory itself: released by the kernel when the process ends."""
        self._fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._fd)
            self._fd = None
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            record = self._read_record(quiet=True) or {}
            holder = f"PID {record['pid']}" if record.get("status") == "running" and "pid" in record else "another process"
            raise RunDirError(f"{self.out} is in use by {holder} (another bridgeprobe run); wait for it to end "
                              "or choose another --out") from None

    def _read_record(self, quiet: bool = False) -> dict[str, Any] | None:
        path = self.out / RUN_JSON
        if not path.is_file():
            return None
        try:
            return read_run_record(path, "pass --overwrite to start the run again")
        except RunDirError:
            if quiet:
                return None
            if self.overwrite:
                return {}
            raise

    def _empty(self) -> None:
        """Remove everything in the directory (it stays, with its lock)."""
        for entry in self.out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @classmethod
    @contextmanager
    def locked(cls, out: Path) -> Iterator["RunDirectory"]:
        """Only the lock, for jobs that rewrite a finished run's derived files (``report``, ``memory-report``)."""
        run = cls(out, {})
        run._lock()
        try:
            yield run
        finally:
            run._release()

    # ------------------------------------------------------------------ finishing
    def finish(self, record: dict[str, Any], summary: str = "") -> None:
        """Write the final ``run.json``: the job's record with the fingerprint, ``status: finished``, the summary
        printed on a rerun, and the row count of each CSV in the directory (``report`` checks them)."""
        write_finished(self.out, record, summary, self.fingerprint)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None and not self.resumed and distributed.context().is_main:
            self._tidy()
        self._release()

    def _tidy(self) -> None:
        """After an error before any result was written (e.g. a prompt longer than the context): leave the
        directory as it was, not holding a run that never started."""
        entries = list(self.out.iterdir())
        if [e.name for e in entries] != [RUN_JSON]:
            return
        (self.out / RUN_JSON).unlink()
        if self._created:
            self.out.rmdir()

    def _release(self) -> None:
        RESUMED_RUNS.discard(self.out.resolve())
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def run_directory(out: Path, fingerprint: dict[str, Any], *, overwrite: bool = False,
                  recompute: bool = False) -> RunDirectory:
    """Lock ``out`` and apply the rerun rules for ``fingerprint``; raises :class:`RunComplete` (exit 0) or
    :class:`RunDirError` (exit 2) instead of entering when the job must not run."""
    return RunDirectory(out, fingerprint, overwrite=overwrite, recompute=recompute)


def write_finished(out: Path, record: dict[str, Any], summary: str = "",
                   fingerprint: dict[str, Any] | None = None) -> None:
    """Write ``out/run.json`` of a finished run in one atomic step: ``record``, ``status: finished``, the
    fingerprint (given, or the one :class:`RunDirectory` recorded at the start), the summary a rerun prints and
    the row count of each CSV in ``out``. For library jobs that write their own run.json (reproduce, finetune)."""
    if not distributed.context().is_main:
        return
    if fingerprint is None:
        try:
            fingerprint = json.loads((out / RUN_JSON).read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            fingerprint = None
    rows = {f.name: _count_rows(f) for f in sorted(out.glob("*.csv")) if ".partial" not in f.name}
    atomic_write_json(out / RUN_JSON, {**record, "status": "finished", "finished": _now(),
                                       **({"fingerprint": fingerprint} if fingerprint is not None else {}),
                                       "summary": summary, "rows": rows})


def table_path(out: Path, name: str) -> Path:
    """``out/name``, or its gzip-compressed copy ``out/name.gz`` where only that exists (large tables of the
    checked-in example reports are stored compressed)."""
    path = out / name
    packed = path.with_name(path.name + ".gz")
    return packed if not path.is_file() and packed.is_file() else path


def check_rows(out: Path, name: str, record: dict[str, Any] | None = None) -> None:
    """Stop with a clear error when ``out/name`` (or ``name.gz``) has not the row count its finished run recorded
    (cut short or edited since); ``record``: the run's run.json when the caller has read it already."""
    path = table_path(out, name)
    record = record if record is not None else read_run_record(out / RUN_JSON)
    if record.get("status", "finished") != "finished":
        raise RunDirError(f"{out} holds an unfinished run; rerun its command to finish it first")
    expected = (record.get("rows") or {}).get(name)
    found = _count_rows(path)
    if expected is not None and found != expected:
        raise RunDirError(f"{path} has {found} rows but its run wrote {expected}: the file is damaged or cut short; "
                          "rerun the job with --recompute")


def check_prompt_files(out: Path, record: dict[str, Any] | None = None) -> None:
    """Stop with a clear error when a prompt file that the finished run in ``out`` read has other content now
    (its sha256 against the run's fingerprint): a report must not pair the edited prompts with old results."""
    record = record if record is not None else read_run_record(out / RUN_JSON)
    recorded = (record.get("fingerprint") or {}).get("prompts")
    entries = (record.get("settings") or {}).get("prompts")
    if not recorded or not entries:
        return
    for entry, old, now in zip(entries, recorded, prompt_identity(list(entries)) or []):
        if old != now:
            raise RunDirError(f"{entry}: this prompt file has changed since the run in {out} read it ({old} -> "
                              f"{now.split()[-1]}); restore it, or rerun the job with --recompute")


def _count_rows(path: Path) -> int:
    """Data rows of a CSV file (quoted newlines counted correctly)."""
    import csv

    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        return max(sum(1 for _ in csv.reader(fh)) - 1, 0)


def _looks_like_a_run(out: Path) -> bool:
    """Whether ``out`` holds bridgeprobe outputs (so that --overwrite may empty it), not someone's other files."""
    return any(out.glob("*.partial.csv")) or any(out.glob(".*.settings.json")) or (out / "shards").is_dir()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
