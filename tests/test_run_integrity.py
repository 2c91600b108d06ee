"""Run integrity under faults, on a tiny saved checkpoint: one run per output directory (lock, fingerprint, rerun
rules), SIGKILL at seeded random points then a rerun equal to an uninterrupted run byte for byte, and every bad
option, file or directory stopped with exit 2 and one line before the model loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import place_items, save_tiny_checkpoint
from bridgeprobe.probes.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ws/model``: a tiny Llama with a word-level tokenizer (no hub); ``ws/prompts.jsonl``: eight paired items."""
    path = tmp_path_factory.mktemp("integrity")
    save_tiny_checkpoint(path)
    return path


def lens_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["lens", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--batch-size", "3", *extra]


def patch_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["patch", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--limit", "2", "--bridge-rank", *extra]


def memory_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["memory", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--items", "2", "--map-items", "1", *extra]


def run_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(ws / "model"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--limit", "4", "--batch-size", "3", "--patch-pairs", "2", "--memory-items", "2", "--memory-map-items", "1",
            *extra]


JOBS = {"lens": lens_args, "patch": patch_args, "memory": memory_args, "run": run_args}


def cli(args: list[str]) -> int:
    """``bridgeprobe ARGS`` in this process; argparse errors exit through SystemExit."""
    try:
        return main(args)
    except SystemExit as stop:
        return int(stop.code)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (recursively) with its bytes."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def results(directory: Path) -> dict[str, object]:
    """The result files that must not depend on interruptions: tables byte for byte, and JSON summaries without
    their timings, resume counts and provenance (its command names the output directory; not run.json, nor
    images)."""
    def untimed(value: object) -> object:
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items()
                    if k not in ("timings", "provenance") and not k.endswith("_s") and not k.startswith("resumed")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    return {name: untimed(json.loads(data)) if name.endswith(".json") else data
            for name, data in snapshot(directory).items() if name.endswith((".csv", ".json")) and name != "run.json"}


@pytest.fixture(scope="module")
def reference(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run of each job, on one thread like the runs it is compared with (a float sum may round
    differently when split over more threads)."""
    import torch

    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job, args in JOBS.items():
            assert cli(args(ws, root / job)) == 0
    finally:
        torch.set_num_threads(threads)
    return {job: root / job for job in JOBS}


# --------------------------------------------------------------------------------------------- SIGKILL

KILLER = textwrap.dedent('''
    """Run bridgeprobe, SIGKILLing (or stalling) this process at a chosen point of its output writes."""
    import os, signal, sys, time
    import bridgeprobe.probes.io.results as results
    how, n, fraction = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    count = [0]

    def stop():
        if how == "stall":
            print("stalled", flush=True)
            time.sleep(600)
        os.kill(os.getpid(), signal.SIGKILL)

    if how in ("append", "stall"):  # the n-th batch of rows: write a fraction of it, then stop
        real_write = results.IncrementalCSV._write
        def write(self, text, mode):
            if mode == "a":
                count[0] += 1
                if count[0] == n:
                    with self.partial.open("a", newline="", encoding="utf-8") as fh:
                        fh.write(text[: int(len(text) * fraction)])
                    stop()
            return real_write(self, text, mode)
        results.IncrementalCSV._write = write
    else:  # "replace": the n-th atomic rename (offsets, settings, final tables, run.json); "finish": the n-th
        real_replace = os.replace  # rename onto run.json (the 2nd is the finished run's record)
        def replace(src, dst):
            if how == "replace" or os.path.basename(dst) == "run.json":
                count[0] += 1
                if count[0] == n:
                    stop()
            return real_replace(src, dst)
        os.replace = replace
    from bridgeprobe.probes.cli import main
    sys.exit(main(sys.argv[4:]))
''')


def killed_run(tmp_path: Path, mode: str, n: int, fraction: float, args: list[str]) -> int:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), mode, str(n), str(fraction), *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
    return done.returncode


SEED = 20261129
rng = random.Random(SEED)
KILLS = [("lens", "append", rng.randint(1, 13), rng.random()), ("run", "append", rng.randint(1, 8), rng.random()),
         ("lens", "replace", rng.randint(1, 20), 0.0), ("patch", "append", rng.randint(1, 4), rng.random()),
         ("patch", "replace", rng.randint(2, 12), 0.0), ("memory", "append", rng.randint(1, 2), rng.random())]


@pytest.mark.parametrize(("job", "mode", "n", "fraction"), KILLS, ids=[f"{j}-{m}-{n}" for j, m, n, _ in KILLS])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(ws: Path, reference: dict[str, Path], tmp_path: Path,
                                                        one_thread, job: str, mode: str, n: int,
                                                        fraction: float) -> None:
    out = tmp_path / "out"
    args = JOBS[job](ws, out)
    rc = killed_run(tmp_path, mode, n, fraction, args)
    if rc == -signal.SIGKILL:
        assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert cli(args) == 0
    assert results(out) == results(reference[job])
    record = json.loads((out / "run.json").read_text())
    expected = json.loads((reference[job] / "run.json").read_text())
    assert record["status"] == "finished" and record["fingerprint"] == expected["fingerprint"]
    assert record["rows"] == expected["rows"]


def test_a_run_killed_after_its_tables_resumes_without_recomputing_them(ws: Path, reference: dict[str, Path],
                                                                        tmp_path: Path, one_thread) -> None:
    out = tmp_path / "out"
    args = run_args(ws, out)
    assert killed_run(tmp_path, "finish", 2, 0.0, args) == -signal.SIGKILL  # every table written, run.json not
    assert cli(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_queries"] == record["n_queries"] > 0  # the lens was not run again
    assert results(out) == results(reference["run"])


def test_damaged_partial_files_are_recomputed_not_fatal(ws: Path, reference: dict[str, Path], tmp_path: Path,
                                                        one_thread) -> None:
    out = tmp_path / "out"
    args = lens_args(ws, out)
    assert killed_run(tmp_path, "append", 4, 0.5, args) == -signal.SIGKILL
    before = snapshot(out)
    assert cli(lens_args(ws, out, "--dtype", "bfloat16")) == 2  # resuming with other settings is refused
    assert snapshot(out) == before
    (out / ".lens.offset").unlink()  # a kill between the rows and their offset record, or a lost file
    assert cli(args) == 0 and results(out) == results(reference["lens"])
    out2 = tmp_path / "out2"
    assert killed_run(tmp_path, "append", 3, 0.3, lens_args(ws, out2)) == -signal.SIGKILL
    (out2 / "lens.partial.csv").write_bytes(b"")  # a header-less partial file
    assert cli(lens_args(ws, out2)) == 0 and results(out2) == results(reference["lens"])


# ------------------------------------------------------------------------------------------- the lock


def test_a_second_run_into_a_directory_in_use_stops_and_the_lock_dies_with_its_process(
        ws: Path, reference: dict[str, Path], tmp_path: Path, one_thread, capsys) -> None:
    out = tmp_path / "out"
    args = lens_args(ws, out)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    first = subprocess.Popen([sys.executable, str(script), "stall", "3", "1.0", *args], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout.readline().strip() == "stalled"
        before = snapshot(out)
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by PID {first.pid}" in err and err.count("\n") == 1
        assert cli(lens_args(ws, out, "--limit", "2", "--overwrite")) == 2  # not even --overwrite gets in
        assert snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    assert cli(args) == 0  # SIGKILL left no stale lock: the rerun resumes
    assert results(out) == results(reference["lens"])


# ------------------------------------------------------------------------------------------- reruns


def test_rerun_rules(ws: Path, reference: dict[str, Path], tmp_path: Path, one_thread, capsys) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference["lens"], out)
    before = snapshot(out)
    capsys.readouterr()
    # finished, same settings: its summary, exit 0, nothing recomputed
    assert cli(lens_args(ws, out)) == 0
    assert "already finished" in capsys.readouterr().out and snapshot(out) == before
    # another setting: exit 2 naming it, old -> new, and nothing changed
    for extra, named in ((["--limit", "2"], "limit: null -> 2"), (["--dtype", "bfloat16"], 'dtype: "float32" -> "bfloat16"'),
                         (["--all-positions"], "options.all_positions: false -> true"),
                         (["--seed", "3"], "seed: 0 -> 3")):
        assert cli(lens_args(ws, out, *extra)) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
        assert snapshot(out) == before
    # the same prompt file path with other content
    edited = tmp_path / "prompts.jsonl"
    edited.write_text((ws / "prompts.jsonl").read_text())
    args = lens_args(ws, out)
    args[args.index("--prompts") + 1] = str(edited)
    assert cli(args) == 0  # same content elsewhere: the same run
    capsys.readouterr()
    edited.write_text(edited.read_text().replace("Madrid", "Granada"))
    assert cli(args) == 2
    assert "prompts: " in capsys.readouterr().err and snapshot(out) == before
    # --recompute redoes a finished run; the result is the same
    assert cli(lens_args(ws, out, "--recompute")) == 0
    assert results(out) == results(reference["lens"])
    # --overwrite replaces the directory's contents as a whole
    (out / "stray.csv").write_text("a\n1\n")
    assert cli(lens_args(ws, out, "--limit", "2", "--overwrite")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["fingerprint"]["limit"] == 2 and sorted(snapshot(out)) == ["lens.csv", "run.json"]


def test_directories_that_hold_no_run_or_a_damaged_one(ws: Path, tmp_path: Path, one_thread, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli(lens_args(ws, foreign, "--overwrite")) == 2
    assert "holds no bridgeprobe run" in capsys.readouterr().err and (foreign / "notes.txt").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"command": "lens", "stat')
    assert cli(lens_args(ws, damaged, "--limit", "1")) == 2
    assert "run.json is damaged" in capsys.readouterr().err
    assert cli(lens_args(ws, damaged, "--limit", "1", "--overwrite")) == 0


def test_report_checks_the_row_count_and_works_from_any_directory(ws: Path, tmp_path: Path, one_thread,
                                                                   monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    monkeypatch.chdir(ws)
    args = ["lens", "--model", "model", "--prompts", "prompts.jsonl", "--out", str(out), "--limit", "4", "--report"]
    assert cli(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert Path(record["settings"]["prompts"][0]).is_absolute()
    assert record["model"] == "model" and record["model_path"] == str((ws / "model").resolve())  # as typed; resolved
    monkeypatch.chdir(tmp_path)
    assert cli(["report", str(out)]) == 0
    lines = (out / "lens.csv").read_bytes().splitlines(keepends=True)
    (out / "lens.csv").write_bytes(b"".join(lines[: len(lines) // 2]))
    capsys.readouterr()
    assert cli(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lens.csv has" in err and "--recompute" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------ bad options and files


def _truncated_checkpoint(ws: Path, tmp_path: Path) -> str:
    import shutil

    copy = tmp_path / "cut"
    shutil.copytree(ws / "model", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return str(copy)


BAD = {
    "limit 0": (lambda ws, tmp: ["--limit", "0"], "argument --limit: must be at least 1, got 0"),
    "limit -1": (lambda ws, tmp: ["--limit", "-1"], "must be at least 1, got -1"),
    "batch size 0": (lambda ws, tmp: ["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    "max-memory list": (lambda ws, tmp: ["--max-memory", "[1]"], "--max-memory must be a JSON object"),
    "max-memory junk": (lambda ws, tmp: ["--max-memory", "{0: 1"], "--max-memory must be a JSON object"),
    "max-memory device": (lambda ws, tmp: ["--max-memory", '{"gpu0": "1GiB"}'], "device 'gpu0' must be"),
    "unknown device": (lambda ws, tmp: ["--device", "tpu7"], "is not a device name"),
    "truncated safetensors": (lambda ws, tmp: ["--model", _truncated_checkpoint(ws, tmp)],
                              "model.safetensors is cut short or damaged"),
    "empty model dir": (lambda ws, tmp: ["--model", str(_mkdir(tmp / "empty"))], "is empty: not a model checkpoint"),
    "not a gguf": (lambda ws, tmp: ["--model", str(_write(tmp / "x.gguf", b"PK\x03\x04 not gguf"))],
                   "is not a GGUF file"),
    "non-UTF-8 prompts": (lambda ws, tmp: ["--prompts", str(_write(tmp / "latin.jsonl", "".join(
        json.dumps(i, ensure_ascii=False).replace("Belgium", "België") + "\n" for i in place_items()).encode("latin-1")))],
        "latin.jsonl:2: not UTF-8 text (byte 0xeb"),
    "bad JSON line": (lambda ws, tmp: ["--prompts", str(_write(tmp / "b.jsonl", b'{"id": "a",\n'))],
                      "b.jsonl:2: not valid JSON"),
    "missing field": (lambda ws, tmp: ["--prompts", str(_write(tmp / "m.jsonl", b'{"id": "a", "two_hop": "x"}\n'))],
                      "m.jsonl:1: field 'bridge': required field is missing"),
    "bad format string": (lambda ws, tmp: ["--prompts", str(_csv(tmp)), "--columns", "id={landmark", "two_hop=two_hop",
                                           "bridge=bridge", "answer=answer"],
                          "--columns id: '{landmark' is not a valid format string"),
    "format string column": (lambda ws, tmp: ["--prompts", str(_csv(tmp)), "--columns", "id={nope}",
                                              "two_hop=two_hop", "bridge=bridge", "answer=answer"],
                             "p.csv:2: field 'id': mapping '{nope}' needs column 'nope'"),
    "prompt longer than the context": (lambda ws, tmp: ["--prompts", str(_write(tmp / "long.jsonl", json.dumps(
        {"id": "long", "two_hop": "The capital of" + " word" * 80 + " is", "bridge": "Spain", "answer": "Madrid"})
        .encode()))], "item 'long': field 'two_hop' is 84 tokens, longer than the model's context window of 64"),
    "missing prompt file": (lambda ws, tmp: ["--prompts", str(tmp / "nowhere.jsonl")], "nowhere.jsonl: file not found"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _csv(tmp: Path) -> Path:
    import csv

    path = tmp / "p.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["landmark", "two_hop", "bridge", "answer"])
        writer.writeheader()
        writer.writerows({"landmark": i["id"], "two_hop": i["two_hop"], "bridge": i["bridge"], "answer": i["answer"]}
                         for i in place_items())
    return path


def _with(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra``'s options replacing the same options (each option here takes values up to the
    next ``--``)."""
    args = list(args)
    i = 0
    while i < len(extra):
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        if extra[i] in args:
            k = args.index(extra[i]) + 1
            while k < len(args) and not args[k].startswith("--"):
                k += 1
            args[args.index(extra[i]): k] = extra[i:j]
        else:
            args += extra[i:j]
        i = j
    return args


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_option_or_file_is_exit_2_with_one_line(ws: Path, tmp_path: Path, one_thread, capsys,
                                                        case: str) -> None:
    extra, message = BAD[case]
    out = tmp_path / "out"
    rc = cli(_with(lens_args(ws, out), extra(ws, tmp_path)))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and err.endswith("\n") and message in err.splitlines()[-1]
    if case != "prompt longer than the context":  # only that one gets as far as loading (transformers' loading bar)
        assert err.count("\n") == 1
    assert not out.exists()  # nothing written (the context check stops after the tokenizer loads, and tidies up)


def test_output_paths_that_cannot_be_used(ws: Path, tmp_path: Path, one_thread, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert cli(lens_args(ws, a_file)) == 2
    assert "is a file, not a directory" in capsys.readouterr().err and a_file.read_text() == "keep"
    assert cli(lens_args(ws, a_file / "below")) == 2
    assert "cannot create the output directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert cli(lens_args(ws, locked / "out")) == 2
        assert "cannot create the output directory" in capsys.readouterr().err


def test_patch_and_memory_options_are_checked_before_loading(ws: Path, tmp_path: Path, one_thread, capsys) -> None:
    out = tmp_path / "out"
    assert cli(patch_args(ws, out, "--site", "resid_pre,bogus")) == 2
    assert "unknown site 'bogus'" in capsys.readouterr().err
    assert cli(memory_args(ws, out, "--stride", "0")) == 2
    assert "argument --stride: must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_debug_shows_the_traceback(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--max-memory"):
        main(["--debug", *lens_args(ws, tmp_path / "out", "--max-memory", "[1]")])


def test_bom_pretty_json_and_long_csv_fields_load(tmp_path: Path) -> None:
    from bridgeprobe.prompts.loaders import load_prompts

    items = place_items()
    bom = _write(tmp_path / "bom.jsonl", "".join(json.dumps(i) + "\n" for i in items).encode("utf-8-sig"))
    pretty = _write(tmp_path / "pretty.json", json.dumps(items, indent=2).encode())
    stream = _write(tmp_path / "stream.jsonl", "\n".join(json.dumps(i, indent=2) for i in items).encode())
    assert load_prompts([bom]) == load_prompts([pretty]) == load_prompts([stream])
    broken = json.loads(json.dumps(items))
    del broken[3]["bridge"]
    with pytest.raises(ValueError, match=r"bad.json:\d+: field 'bridge'") as err:
        load_prompts([_write(tmp_path / "bad.json", json.dumps(broken, indent=2).encode())])
    line = int(str(err.value).split(":")[1])
    assert '"id": "uluru"' in (tmp_path / "bad.json").read_text().splitlines()[line]  # the record's first line + 1
    long = tmp_path / "long.csv"
    long.write_text('two_hop,bridge,answer\n"' + "x" * 200_000 + ' is",B,A\n')
    loaded = load_prompts([long], columns={"id": "bridge", "two_hop": "two_hop", "bridge": "bridge", "answer": "answer"})
    assert len(loaded[0].two_hop) == 200_003


def test_run_json_records_offline_from_the_environment(ws: Path, tmp_path: Path, one_thread, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert cli(lens_args(ws, out, "--limit", "1")) == 0
    assert json.loads((out / "run.json").read_text())["load"]["offline"] is True


def test_no_future_warning_from_the_patching_engine(ws: Path, tmp_path: Path, one_thread) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert cli(patch_args(ws, tmp_path / "out", "--limit", "1")) == 0
