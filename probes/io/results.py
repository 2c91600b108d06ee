"""Result files that survive interruption: rows are appended to ``NAME.partial.csv`` as they are computed, a
rerun with the same settings skips what is done, and the final file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Let an OSError raised while writing ``path`` name it: a failed ``write`` or ``close`` (a full disk) carries
    no file name, and the user's one-line message must say which file."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, frame.to_csv(index=False))


RESUMED_RUNS: set[Path] = set()
"""Output directories that :mod:`probes.runs.rundir` is resuming in this process: the same fingerprint, unfinished.
A store there without a partial file but with its final table had finished before the interruption; it resumes
from that table instead of recomputing it."""


class ResumeMismatch(RuntimeError):
    """An interrupted run in the output directory used other settings."""


class IncrementalCSV:
    """Append-only rows for ``DIR/NAME.csv``, resumable while the run's ``settings`` stay the same.

    Each :meth:`append` is one batch; after it is on disk its end offset is committed, and a resumed run cuts
    the partial file back to the last committed batch, so a kill mid-write never leaves half a batch behind.
    """

    def __init__(self, out_dir: Path, name: str, columns: Sequence[str], settings: dict[str, Any]) -> None:
        self.final = out_dir / f"{name}.csv"
        self.partial = out_dir / f"{name}.partial.csv"
        self.settings_file = out_dir / f".{name}.settings.json"
        self.offset_file = out_dir / f".{name}.offset"
        self.columns = list(columns)
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings, default=str))
        buffer = io.StringIO()
        csv.writer(buffer).writerow(self.columns)
        header = buffer.getvalue()
        if self.partial.exists():
            try:
                previous = json.loads(self.settings_file.read_text()) if self.settings_file.exists() else None
            except ValueError:
                previous = None
            if previous != settings:
                raise ResumeMismatch(f"{self.partial} is an interrupted run with other settings (or its "
                                     f"{self.settings_file.name} is missing); rerun with --overwrite to start over")
            offset = self._committed(header)
            with self.partial.open("r+b") as fh:
                fh.truncate(offset)
            if offset == 0:  # nothing usable was committed: start the file again
                self._write(header, mode="w")
        else:
            atomic_write_json(self.settings_file, settings)
            finished = self.final.read_text(encoding="utf-8") if self._final_is_this_runs(out_dir) else ""
            same_columns = finished.split("\n", 1)[0].rstrip("\r") == header.rstrip("\r\n")
            # a resumed run whose store had already finished: its final table holds the committed rows
            self._write(finished if same_columns else header, mode="w")

    def _final_is_this_runs(self, out_dir: Path) -> bool:
        """Whether ``NAME.csv`` was written by the run now resuming (:data:`RESUMED_RUNS`), not an earlier one."""
        if not self.final.is_file():
            return False
        where = out_dir.resolve()
        return any(where == run or run in where.parents for run in RESUMED_RUNS)

    def _committed(self, header: str) -> int:
        """Where the committed rows of the partial file end; 0 when the file cannot be resumed safely (no or a
        damaged offset record, a header that is missing or lists other columns): its rows are then recomputed."""
        data = self.partial.read_bytes()
        try:
            offset = int(self.offset_file.read_text())
        except (OSError, ValueError):
            offset = -1
        if not data.startswith(header.encode("utf-8")) or not len(header) <= offset <= len(data):
            return 0
        return offset

    def done(self, key_columns: Sequence[str]) -> set[tuple[str, ...]]:
        """Keys (as strings) of the rows already written."""
        frame = pd.read_csv(self.partial, usecols=list(key_columns), dtype=str, keep_default_na=False)
        return set(frame.itertuples(index=False, name=None))

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append one batch of rows and commit it."""
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns).writerows(rows)
        self._write(buffer.getvalue(), mode="a")

    def _write(self, text: str, mode: str) -> None:
        with naming(self.partial), self.partial.open(mode, newline="", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
            offset = fh.tell()
        atomic_write(self.offset_file, str(offset))

    def rows(self) -> str:
        """The committed rows as CSV text, without the header line (what a data-parallel merge collects)."""
        text = self.partial.read_bytes()[: int(self.offset_file.read_text())].decode("utf-8")
        return text.split("\n", 1)[1] if "\n" in text else ""

    def finish(self, sort_by: Sequence[str]) -> pd.DataFrame:
        """Sort the rows, write the final CSV atomically and drop the partial file."""
        frame = _write_sorted(self.final, self.partial, sort_by)
        self.discard()
        return frame

    def discard(self) -> None:
        """Delete the partial file and its bookkeeping (after its rows went into a final file)."""
        self.partial.unlink(missing_ok=True)
        self.settings_file.unlink(missing_ok=True)
        self.offset_file.unlink(missing_ok=True)


def finish_rows(final: Path, columns: Sequence[str], texts: Iterable[str], sort_by: Sequence[str]) -> pd.DataFrame:
    """Write ``final`` from the committed rows of several stores (:meth:`IncrementalCSV.rows`), exactly as
    :meth:`IncrementalCSV.finish` writes one store's: the same parsing, sorting and atomic write."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(list(columns))
    buffer.write("".join(texts))
    buffer.seek(0)
    return _write_sorted(final, buffer, sort_by)


TEXT_COLUMNS = frozenset({"prompt_id", "clean_id", "corrupt_id", "source_id", "receiving_id", "item_id",
                          "prompt_token", "target_token", "token"})
"""Columns of the package's tables that hold text whatever it looks like: ids (``"01"`` is not ``"1"``, ``"NA"``
and ``"null"`` are ids, not missing values) and decoded tokens."""
MISSING = ("", "nan", "NaN")
"""How the package's writers spell a missing number (pandas writes "", the csv module "nan")."""


def read_table(source: Path | str | io.StringIO) -> pd.DataFrame:
    """Read a table the package wrote (``.csv`` or ``.csv.gz``): :data:`TEXT_COLUMNS` exactly as written, the
    other columns as pandas infers them, from all rows at once (so types do not depend on row order). The one
    reader for the package's own CSVs: every re-read must keep ids as the text the run used."""
    header = list(pd.read_csv(source, nrows=0).columns)
    if isinstance(source, io.StringIO):
        source.seek(0)
    return pd.read_csv(source, dtype={c: str for c in header if c in TEXT_COLUMNS}, keep_default_na=False,
                       na_values={c: list(MISSING) for c in header if c not in TEXT_COLUMNS}, low_memory=False)


def _write_sorted(final: Path, source: Path | io.StringIO, sort_by: Sequence[str]) -> pd.DataFrame:
    frame = read_table(source)
    frame = frame.sort_values(list(sort_by), kind="stable").reset_index(drop=True)
    atomic_write_csv(final, frame)
    return frame
