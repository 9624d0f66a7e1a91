import json
import textwrap

import pytest

from honellm.config import apply_overrides, parse_override
from honellm.errors import DataError, HoneError
from honellm.reward.functions import task_reward
from honellm.runtime.tasks import load_task
from honellm.task import Task, TaskConfig


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def sentiment(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(20)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return write(tmp_path / "task.yaml", """\
        name: sentiment
        data:
          train: data/train.jsonl
          validation: data/val.jsonl
        prompt:
          system: Classify.
          template: "Review: {text}"
        target: label
        choices: [positive, negative]
        """)


def test_task_loads_with_paths_relative_to_the_yaml(sentiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    task = Task.load(sentiment)
    assert task.name == "sentiment"
    assert task.available_splits() == ["train", "validation"]
    assert len(task.split("train")) == 20 and len(task.split("validation")) == 5
    assert task.format == "fields" and task.kind == "sft" and task.metric == "accuracy"
    record = task.split("train")[1]
    assert task.messages(record) == [{"role": "user", "content": "Review: review 1"}]
    assert task.target(record) == "positive"
    with pytest.raises(HoneError, match="no test split"):
        task.split("test")


def test_overrides_change_values_and_cli_paths_resolve_from_cwd(sentiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "data")
    task = Task.load(sentiment, ["prompt.system=Be brief.", "data.test=val.jsonl", "generation.max_new_tokens=3"])
    assert task.config.prompt.system == "Be brief."
    assert task.config.generation.max_new_tokens == 3
    assert len(task.split("test")) == 5


def test_unknown_keys_suggest_the_closest_name(sentiment):
    with pytest.raises(HoneError) as err:
        Task.load(sentiment, ["prompt.tempalte=x"])
    assert "did you mean 'template'" in err.value.fix
    with pytest.raises(HoneError) as err:
        Task.load(sentiment, ["modle=x"])
    assert "did you mean 'model'" in err.value.fix


def test_yaml_errors_name_file_and_line(tmp_path):
    path = write(tmp_path / "t.yaml", """\
        name: t
        data:
          train: x.jsonl
        prompt:
          sytem: hello
        """)
    with pytest.raises(HoneError) as err:
        Task.load(path)
    assert f"{path}:5" in err.value.what and "prompt.sytem" in err.value.what
    assert "did you mean 'system'" in err.value.fix
    bad = write(tmp_path / "b.yaml", "name: [unclosed\n")
    with pytest.raises(HoneError, match="not valid YAML"):
        Task.load(bad)


def test_value_errors_carry_the_line_and_the_field_help(tmp_path):
    path = write(tmp_path / "t.yaml", "data:\n  train: x.jsonl\ngeneration:\n  max_new_tokens: -1\n")
    with pytest.raises(HoneError) as err:
        Task.load(path)
    assert f"{path}:4" in err.value.what and "generation.max_new_tokens" in err.value.what
    assert "tokens generated" in err.value.fix


def test_invalid_records_are_listed_or_skipped_with_lines(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "maybe"}\nnot json\n{"label": "negative"}\n')
    path = write(tmp_path / "t.yaml", f"""\
        data: {{train: {data}}}
        prompt: {{template: "{{text}}"}}
        target: label
        choices: [positive, negative]
        """)
    with pytest.raises(DataError) as err:
        Task.load(path).split("train")
    wheres = [p.where for p in err.value.problems]
    assert wheres == [f"{data}:3", f"{data}:2", f"{data}:4"]
    task = Task.load(path, skip_invalid=True)
    assert len(task.split("train")) == 1
    assert sorted(p.where for p in task.skipped("train")) == sorted(wheres)


def test_fraction_split_is_seeded_and_disjoint(tmp_path):
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(100)))
    path = write(tmp_path / "t.yaml", f"data: {{file: {data}, split: {{validation: 0.1, test: 0.2, seed: 3}}}}\n")
    a, b = Task.load(path), Task.load(path)
    sizes = {s: len(a.split(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 70, "validation": 10, "test": 20}
    assert [r["prompt"] for r in a.split("test")] == [r["prompt"] for r in b.split("test")]
    ids = [set(r["prompt"] for r in a.split(s)) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert a.format == "prompt-completion" and a.target(a.split("train")[0]).startswith("a")
    other = Task.load(path, ["data.split.seed=4"])
    assert [r["prompt"] for r in other.split("test")] != [r["prompt"] for r in a.split("test")]


def test_config_rules():
    with pytest.raises(Exception, match="either `file`"):
        TaskConfig.model_validate({"data": {"file": "a.jsonl", "train": "b.jsonl"}})
    with pytest.raises(Exception, match="no data"):
        TaskConfig.model_validate({"data": {}})
    with pytest.raises(Exception, match="distinct"):
        TaskConfig.model_validate({"data": {"train": "a"}, "choices": ["a", "a"]})


def test_unknown_metric_suggests(sentiment):
    with pytest.raises(HoneError) as err:
        load_task(sentiment, ["metric=acuracy"])
    assert "did you mean 'accuracy'" in err.value.fix


def test_parse_override_reads_yaml_values():
    assert parse_override("lr=1e-4") == ("lr", 1e-4)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("x=[1, 2]") == ("x", [1, 2])
    assert parse_override("s=hello world") == ("s", "hello world")
    assert parse_override("n=null") == ("n", None)
    with pytest.raises(HoneError, match="key=value"):
        parse_override("nokey")
    data = apply_overrides({"data": {"train": "a"}}, ["data.split.seed=5"], TaskConfig)
    assert data["data"]["split"] == {"seed": 5}


def test_formats_through_the_task(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n")
    task = Task.from_config({"data": {"train": str(hh)}})
    assert task.kind == "preference" and task.metric == "preference_accuracy"
    pair = task.pairs("train")[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ([{"role": "user", "content": "hi"}], "hello", "go away")
    assert [(u.completion, u.desirable) for u in task.unpaired("train")] == [("hello", True), ("go away", False)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    task = Task.from_config({"data": {"train": str(chat)}})
    ex = task.examples("train")[0]
    assert ex.messages[-1] == {"role": "user", "content": "q"} and ex.target == "a"
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    task = Task.from_config({"data": {"train": str(alpaca)}})
    assert task.examples("train")[0].messages == [{"role": "user", "content": "Add\n\n2 and 3"}]
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "q", "completion": "a", "label": False}) + "\n")
    task = Task.from_config({"data": {"train": str(kto)}})
    assert task.kind == "unpaired" and task.unpaired("train")[0].desirable is False
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    task = Task.from_config({"data": {"train": str(ref)}})
    assert task.kind == "reference" and task.target(task.split("train")[0]) == "4"


def test_fields_data_without_template_is_a_clear_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x", "label": "y"}) + "\n")
    task = Task.from_config({"data": {"train": str(data)}})
    with pytest.raises(HoneError, match="must name target and prompt.template"):
        task.split("train")


def test_task_rewards_are_checked_at_load_and_built_on_use():
    task = load_task("arithmetic_hackable")
    reward = task_reward(task)
    assert reward(["q"], ["Let's see: 7"], target=["7"]) == [pytest.approx(1.2)]
    assert task_reward(task, gold=True)(["q"], ["8"], target=["7"]) == [0.0]
    assert task_reward(task) is reward  # built once per task
    with pytest.raises(HoneError) as err:
        load_task("arithmetic", ["rewards=[{name: numeric_mach}]"])
    assert "did you mean 'numeric_match'" in err.value.fix
    with pytest.raises(HoneError, match="no gold_rewards"):
        task_reward(load_task("arithmetic"), gold=True)
