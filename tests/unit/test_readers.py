import json

import pytest

from honellm.data.readers import read_records
from honellm.errors import HoneError


def test_jsonl_reports_bad_lines_with_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{not json}\n[1, 2]\n{"a": 2}\n')
    result = read_records(path)
    assert [dict(r) for r in result.records] == [{"a": 1}, {"a": 2}]
    assert [r.where for r in result.records] == [f"{path}:1", f"{path}:5"]
    assert [p.where for p in result.problems] == [f"{path}:3", f"{path}:4"]
    assert "not valid JSON" in result.problems[0].what
    assert "expected a JSON object" in result.problems[1].what


def test_json_list_items_know_their_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": "x,{\\"}"},\n  {"b": [1, 2]},\n  3\n]\n')
    result = read_records(path)
    assert [r.where for r in result.records] == [f"{path}:2", f"{path}:3"]
    assert result.problems[0].where == f"{path}:4"


def test_json_wrapper_and_jsonl_named_json(tmp_path):
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": [{"a": 1}, {"a": 2}]}))
    assert len(read_records(wrapped).records) == 2
    lines = tmp_path / "l.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert len(read_records(lines).records) == 2


def test_csv_and_tsv(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"hello, world",positive\nbad,row,extra\nshort\n')
    result = read_records(csv_path)
    assert [dict(r) for r in result.records] == [{"text": "hello, world", "label": "positive"}]
    assert [p.where for p in result.problems] == [f"{csv_path}:3", f"{csv_path}:4"]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("text\tlabel\na, b\tnegative\n")
    assert dict(read_records(tsv_path).records[0]) == {"text": "a, b", "label": "negative"}


def test_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), tmp_path / "d.parquet")
    result = read_records(tmp_path / "d.parquet")
    assert [r["prompt"] for r in result.records] == ["p1", "p2"]
    assert result.records[1].where.endswith("#row2")
    ds = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": ["a", "b", "a"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert len(read_records(tmp_path / "ds").records) == 3
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(HoneError, match="several splits"):
        read_records(tmp_path / "dd")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(HoneError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(HoneError, match="unsupported"):
        read_records(tmp_path / "d.xml")
