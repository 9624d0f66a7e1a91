"""Read records from JSONL, JSON lists, CSV/TSV, Parquet and local `datasets` folders.

Every record remembers where it came from (`file:line` for text formats, `file#row` otherwise) so that every
later validation error can point at it. Lines that cannot be parsed are reported as problems, never dropped
silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from honellm.errors import HoneError, Problem

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class Record(dict):
    """A record (a plain dict of fields) that also knows where it came from: `record.where` is `file:line`."""

    __slots__ = ("where",)

    def __init__(self, fields: dict, where: str = "?"):
        super().__init__(fields)
        self.where = where

    def __reduce__(self):
        return (Record, (dict(self), self.where))


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def file_kind(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise HoneError(
            f"unsupported data file type {path.suffix!r}",
            where=str(path),
            fix=f"use one of {', '.join(sorted(SUFFIXES))}, or a folder saved with datasets' save_to_disk",
        )
    return kind


def read_records(path: str | Path) -> ReadResult:
    """Read every record of a data file; unparseable lines become problems with their line numbers."""
    path = Path(path)
    if not path.exists():
        raise HoneError("data file not found", where=str(path), fix="check the path (relative paths in a task YAML are resolved from the YAML's folder)")
    kind = file_kind(path)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv,
              "parquet": _read_parquet, "datasets": _read_datasets}[kind]
    result = ReadResult()
    for item in reader(path):
        (result.problems if isinstance(item, Problem) else result.records).append(item)
    return result


def _read_jsonl(path: Path) -> Iterator[Record | Problem]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield Problem(where, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(value, dict):
                yield Problem(where, f"expected a JSON object per line, found {type(value).__name__}")
                continue
            yield Record(value, where)


def _read_json(path: Path) -> Iterator[Record | Problem]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file that is really JSONL is common; accept it when every line parses.
        if "\n" in text.strip():
            yield from _read_jsonl(path)
            return
        yield Problem(f"{path}:{err.lineno}", f"not valid JSON ({err.msg} at column {err.colno})")
        return
    if isinstance(value, dict):
        # {"data": [...]} or {"train": [...]} wrappers are common; accept a single list-valued key.
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            value = lists[0]
        else:
            yield Record(value, f"{path}:1")
            return
    if not isinstance(value, list):
        yield Problem(f"{path}:1", f"expected a JSON list of objects, found {type(value).__name__}")
        return
    lines = _json_list_item_lines(text, len(value))
    for index, item in enumerate(value):
        where = f"{path}:{lines[index]}" if lines else f"{path}#{index}"
        if isinstance(item, dict):
            yield Record(item, where)
        else:
            yield Problem(where, f"item {index} is {type(item).__name__}, expected an object")


def _json_list_item_lines(text: str, count: int) -> list[int] | None:
    """Line numbers where each top-level list item starts (a light scan that knows strings and nesting)."""
    lines: list[int] = []
    depth, line, in_string, escape, expect_value = 0, 1, False, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
            continue
        if depth == 1 and expect_value and not ch.isspace() and ch not in ",]":
            lines.append(line)
            expect_value = False
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            expect_value = depth == 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            expect_value = True
    return lines if len(lines) == count else None


def _read_csv(path: Path) -> Iterator[Record | Problem]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            yield Problem(f"{path}:1", "no header row")
            return
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                yield Problem(where, f"more columns than the header's {len(reader.fieldnames)}")
                continue
            if any(v is None for v in row.values()):
                yield Problem(where, f"fewer columns than the header's {len(reader.fieldnames)}")
                continue
            yield Record(row, where)


def _read_parquet(path: Path) -> Iterator[Record | Problem]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for index, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}#row{index + 1}")


def _read_datasets(path: Path) -> Iterator[Record | Problem]:
    """A folder written by `datasets.Dataset.save_to_disk` (a DatasetDict is read split by split)."""
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise HoneError(
            "folder is not a saved `datasets` dataset (no dataset_info.json or dataset_dict.json)",
            where=str(path),
            fix="point to a data file, or to a folder written by Dataset.save_to_disk",
        )
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        raise HoneError(
            f"folder holds several splits ({', '.join(data)}); name one",
            where=str(path),
            fix=f"use {path}/<split> for one split, e.g. {path}/{next(iter(data))}",
        )
    for index, row in enumerate(data):
        yield Record(row, f"{path}#row{index + 1}")
