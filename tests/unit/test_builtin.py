import filecmp
from pathlib import Path

import pytest

from honellm.builtin import BUILTIN_TASKS, builtin_records
from honellm.builtin.generators import GENERATORS, SIZES
from honellm.errors import HoneError
from honellm.task import Task

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_are_deterministic_and_splits_disjoint(name):
    assert GENERATORS[name]() == GENERATORS[name]()
    keys = {}
    for split in SIZES[name]:
        records = builtin_records(f"{name}/{split}")
        assert len(records) == SIZES[name][split]
        keys[split] = {str(sorted(r.items())) for r in records}
    splits = list(keys)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not keys[a] & keys[b]


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_tasks_load_and_examples_match(name):
    task = Task.load(name)
    assert task.describe()["splits"]["test"] > 0
    assert filecmp.cmp(ROOT / "examples" / f"{name}.yaml", ROOT / "honellm" / "builtin" / f"{name}.yaml", shallow=False)


def test_intents_labels_are_balanced_enough():
    labels = [r["label"] for r in builtin_records("intents/train")]
    counts = {label: labels.count(label) for label in set(labels)}
    assert len(counts) == 6 and min(counts.values()) > 40


def test_unknown_builtin_data():
    with pytest.raises(HoneError, match="unknown built-in data"):
        builtin_records("nope/train")
