"""Load prompt sets: the bundled ones by name, JSONL files in our schema, and CSV/JSONL tables with a column
mapping (or a named preset such as ``hopping_too_late``).

A column mapping maps our field names to either a column name (``"bridge": "e2_label"``) or a format string
over the row's columns (``"hop2": "{r2_template} is"``); presets may also use a function of the row.
"""

from __future__ import annotations

import csv
import io
import json
import string
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from bridgeprobe.prompts.sampling import sample_items
from bridgeprobe.prompts.schema import PromptItem, PromptSetError, check_set, make_item

Mapper = str | Callable[[Mapping[str, str]], str]


def _fill(template: str, row: Mapping[str, str]) -> str:
    """``"{e2_label}"`` and other format strings over ``row``; a plain column name selects that column."""
    if "{" not in template:
        return row[template]
    return template.format_map(row)


PRESETS: dict[str, dict[str, Mapper]] = {
    # Biran et al. 2024, "Hopping Too Late" (Wikidata-derived): one-hop prompts come from the relation
    # templates ("the capital of {}") filled with the entity label, ending with "is" like the two-hop prompt.
    "hopping_too_late": {
        "id": "htl-{id}",
        "two_hop": "source_prompt",
        "bridge": "e2_label",
        "answer": "e3_label",
        "e1": "e1_label",
        "r1": "r1_type",
        "r2": "r2_type",
        "hop1": lambda row: row["r1_template"].format(row["e1_label"]) + " is",
        "hop2": lambda row: row["r2_template"].format(row["e2_label"]) + " is",
    },
}

BUNDLED = {"curated": "curated.jsonl"}


def bundled_path(name: str) -> Path:
    """Path of a bundled prompt set (``curated``)."""
    if name not in BUNDLED:
        raise PromptSetError(name, None, None, f"no bundled prompt set of this name (have: {', '.join(BUNDLED)})")
    return Path(str(resources.files(__package__) / "data" / BUNDLED[name]))


def _text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; anything else is an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PromptSetError(str(path), line, None, f"not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                                                    f"{column}); save the file as UTF-8") from None


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Let the csv module read fields up to ``limit`` characters (its default stops at 131,072)."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, limit))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _json_values(text: str, source: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each JSON value in ``text``: one per line (JSONL), pretty-printed objects one
    after another, or the elements of a single top-level array."""
    decoder = json.JSONDecoder()
    position, values = 0, []
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position == len(text):
            break
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise PromptSetError(source, err.lineno, None, f"not valid JSON: {err.msg} (column {err.colno})") from None
        values.append((text.count("\n", 0, position) + 1, value, position))
        position = end
    if len(values) == 1 and isinstance(values[0][1], list):  # a JSON array of records: find each one's line
        _, array, start = values[0]
        position = start + 1
        for element in array:
            while text[position] in " \t\r\n,":
                position += 1
            yield text.count("\n", 0, position) + 1, element
            position = decoder.raw_decode(text, position)[1]
        return
    for line, value, _ in values:
        yield line, value


def _records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, record) for each row of a JSONL, JSON or CSV file."""
    source = str(path)
    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise PromptSetError(source, None, None, "prompt files must be .jsonl, .json or .csv")
    text = _text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        with _csv_field_limit(2**31 - 1):
            try:
                for row in reader:
                    yield reader.line_num, dict(row)
            except csv.Error as err:
                raise PromptSetError(source, reader.line_num, None, f"not valid CSV: {err}") from None
        return
    for number, record in _json_values(text, source):
        if not isinstance(record, dict):
            raise PromptSetError(source, number, None, "each record must be a JSON object")
        yield number, record


def _apply_mapping(row: dict[str, object], mapping: Mapping[str, Mapper], source: str, line: int) -> dict[str, object]:
    mapped: dict[str, object] = {}
    for field, mapper in mapping.items():
        try:
            mapped[field] = mapper(row) if callable(mapper) else _fill(mapper, row)  # type: ignore[arg-type]
        except (KeyError, IndexError) as err:
            raise PromptSetError(source, line, field, f"mapping {mapper!r} needs column {err} missing from the row") from err
        except (ValueError, AttributeError) as err:
            raise PromptSetError(source, line, field, f"mapping {mapper!r} is not a valid format string: {err}") from err
    return mapped


def load_prompts(
    paths: str | Path | Sequence[str | Path],
    *,
    columns: Mapping[str, Mapper] | None = None,
    preset: str | None = None,
    limit: int | None = None,
    sample: str = "stratified",
    seed: int = 0,
) -> list[PromptItem]:
    """Load and validate prompt items from bundled names and/or files (JSONL or CSV), in order.

    ``columns`` or ``preset`` maps external columns to our fields; without either, records must already use our
    field names. ``limit`` keeps that many items, chosen by :func:`prompts.sampling.sample_items` (``sample``:
    ``stratified`` over the relation compositions with ``seed``, pair partners kept together, or the ``first``
    ones). Errors name the file, line and field.
    """
    if columns is not None and preset is not None:
        raise ValueError("pass either columns or preset, not both")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (have: {', '.join(PRESETS)})")
    mapping = PRESETS[preset] if preset else columns
    items: list[PromptItem] = []
    where: list[tuple[str, int]] = []
    for entry in [paths] if isinstance(paths, (str, Path)) else list(paths):
        path = bundled_path(str(entry)) if str(entry) in BUNDLED else Path(entry)
        if not path.is_file():
            raise PromptSetError(str(path), None, None, "file not found")
        if path.suffix == ".csv" and mapping is None:
            raise PromptSetError(str(path), None, None, "CSV files need a column mapping (--columns) or a --preset")
        for line, record in _records(path):
            if mapping is not None:
                record = _apply_mapping(record, mapping, str(path), line)
            items.append(make_item(record, str(path), line))
            where.append((str(path), line))
    if not items:
        raise PromptSetError(", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths)), None, None,
                             "no prompt items found")
    check_set(items, where)
    return sample_items(items, limit or None, sample, seed, pairs=True)


def parse_columns(specs: Sequence[str]) -> dict[str, str]:
    """Parse CLI ``field=column`` (or ``field={col} text``) strings into a column mapping."""
    mapping: dict[str, str] = {}
    for spec in specs:
        field, sep, value = spec.partition("=")
        if not sep or not field or not value:
            raise ValueError(f"column mapping {spec!r} must look like field=column")
        if "{" in value or "}" in value:
            try:
                list(string.Formatter().parse(value))
            except ValueError as err:
                raise ValueError(f"--columns {field.strip()}: {value!r} is not a valid format string ({err}); "
                                 "write columns as {column} and literal braces as {{ }}") from None
        mapping[field.strip()] = value
    return mapping

