import pytest

from honellm.atomic import atomic_dir, atomic_write_json
from honellm.errors import HoneError
from honellm.runs import RunDir, never_started, read_metrics


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


def _left_before_first_step(path, *extra):
    """What open_run leaves when the recipe refuses a setting before its first step, plus `extra` files."""
    run = RunDir.create("task", "dpo", out=path)
    run.write_config({"method": "dpo", "task": "task", "config": {"beta": 0.1}})
    run.log_metrics(event="truncated", examples=2, max_length=64)
    run.close()
    for name in extra:
        (path / name).mkdir(parents=True) if name.endswith("/") else (path / name).write_text("x")
    return path


def test_a_folder_left_before_the_first_step_is_reused_without_force(tmp_path):
    left = _left_before_first_step(tmp_path / "refused", "initial-adapter/")
    assert never_started(left)
    again = RunDir.create("task", "dpo", out=left)  # no --force needed: nothing in it was trained
    assert list(again.path.iterdir()) == [again.path / "log.txt"]
    again.close()


@pytest.mark.parametrize("kept", ["checkpoints/", "artifact/", "reference_logps.pt", "notes.txt", "started"])
def test_a_folder_with_anything_trained_or_foreign_still_needs_force(tmp_path, kept):
    path = tmp_path / "run"
    if kept == "started":
        _left_before_first_step(path)
        with open(path / "metrics.jsonl", "a") as handle:
            handle.write('{"event": "start", "step": 0}\n')
    else:
        _left_before_first_step(path, kept)
    assert not never_started(path)
    with pytest.raises(HoneError, match="--force"):
        RunDir.create("task", "dpo", out=path)
    assert (path / "config.yaml").exists()


def test_a_folder_without_hones_record_is_never_taken_for_a_refused_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("lr: 0.001\n")  # the user's own config, not a run's record
    (tmp_path / "yours").mkdir()
    (tmp_path / "yours" / "config.yaml").write_text(": not yaml [\n")
    (tmp_path / "theirs").mkdir()  # a method and a task, but not the record of a run
    (tmp_path / "theirs" / "config.yaml").write_text("method: dpo\ntask: support_prefs\n")
    for name in ("mine", "yours", "theirs"):
        assert not never_started(tmp_path / name)
        with pytest.raises(HoneError, match="--force"):
            RunDir.create("task", "dpo", out=tmp_path / name)


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
