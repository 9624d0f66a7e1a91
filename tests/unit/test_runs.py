import pytest

from honellm.atomic import atomic_dir, atomic_write_json
from honellm.errors import HoneError
from honellm.runs import RunDir, read_metrics


def test_run_folders_are_new_and_never_overwritten(tmp_path):
    run = RunDir.create("task", "lora", root=tmp_path)
    assert run.path.parent == tmp_path / "task" and run.path.name.startswith("lora-")
    run.log_metrics(step=1, loss=2.5)
    run.log_metrics(step=2, loss=2.0)
    run.write_config({"lr": 1e-4})
    run.close()
    rows = read_metrics(run.path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    again = RunDir.create("task", "lora", root=tmp_path)
    assert again.path != run.path
    again.close()
    with pytest.raises(HoneError, match="--force"):
        RunDir.create("task", "lora", out=run.path)
    forced = RunDir.create("task", "lora", out=run.path, force=True)
    assert not (forced.path / "metrics.jsonl").exists()
    forced.close()


def test_metrics_survive_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as tmp:
        atomic_write_json(tmp / "a.json", {"a": 1})
    assert (tmp_path / "out" / "a.json").exists()
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out"):
        pass
