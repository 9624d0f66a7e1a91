"""Reward functions on hand-written cases; specs, user files and their errors."""

from __future__ import annotations

import math
import textwrap

import pytest

from honellm.errors import HoneError
from honellm.reward import functions as R


def score(name: str, completions, prompts=None, **columns):
    """Score completions with the built-in `name`, spec parameters given as `params=`."""
    params = columns.pop("params", {})
    reward = R.REWARD_FUNCTIONS[name](**params)
    return reward(prompts or [""] * len(completions), completions, **columns)


def test_registry_holds_the_builtins_and_rejects_duplicates():
    expected = {
        "exact_match",
        "numeric_match",
        "regex",
        "format",
        "json_valid",
        "length_penalty",
        "choice_correct",
        "contains_keyword",
    }
    assert expected <= set(R.REWARD_FUNCTIONS)
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("regex", R.regex)


def test_completion_text_reads_strings_and_chat_messages():
    assert R.completion_text("hi") == "hi"
    assert R.completion_text([{"role": "assistant", "content": "yo"}]) == "yo"
    assert R.completion_text({"content": "x"}) == "x"
    assert R.completion_text([]) == ""


def test_exact_match_normalises():
    completions = [
        "The Eiffel Tower.",
        "eiffel   tower",
        "Tower",
        [{"role": "assistant", "content": "an Eiffel tower"}],
    ]
    assert score("exact_match", completions, target=["Eiffel Tower"] * 4) == [1.0, 1.0, 0.0, 1.0]
    strict = score("exact_match", ["Paris.", "Paris"], target=["Paris", "Paris"], params={"normalize": False})
    assert strict == [0.0, 1.0]
    assert score("exact_match", ["NYC"], target=[["New York", "NYC"]]) == [1.0]


def test_exact_match_extract_and_column():
    params = {"extract": r"<answer>(.*?)</answer>", "column": "answer"}
    got = score("exact_match", ["think... <answer>42</answer>", "42"], answer=["42", "42"], params=params)
    assert got == [1.0, 0.0]


def test_missing_column_is_a_clear_error():
    with pytest.raises(HoneError, match="needs the record field 'target'") as err:
        score("exact_match", ["a"], label=["a"])
    assert "column:" in err.value.fix


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),
        ("so the answer is 72", 1.0),
        ("The total is $72.00", 1.0),
        ("72.0", 1.0),
        ("first 10, then 72", 1.0),  # the last number counts
        ("72 at first, then 71", 0.0),
        ("#### 72\nbut maybe 5", 1.0),  # `####` wins over the last number
        ("\\boxed{72}", 1.0),
        ("no idea", 0.0),
    ],
)
def test_numeric_match_gsm8k(completion, expected):
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    assert score("numeric_match", [completion], target=[reference]) == [expected]


def test_numeric_match_commas_negatives_and_unscorable_references():
    assert score("numeric_match", ["It costs $1,250."], target=["#### 1,250"]) == [1.0]
    assert score("numeric_match", ["-3"], target=["-3.0"]) == [1.0]
    assert score("numeric_match", ["the list 1, 2, 3 sums to 6"], target=["6"]) == [1.0]
    assert score("numeric_match", ["7"], target=["unknown"]) == [None]


def test_parse_number():
    assert R.parse_number("$1,234.50 total") == 1234.5
    assert R.parse_number("none") is None
    assert R.extract_answer_number("1, 2 and then 3,000") == 3000.0


def test_regex_and_format():
    assert score("regex", ["x <answer>1</answer>", "no"], params={"pattern": r"<answer>.*?</answer>"}) == [
        1.0,
        0.0,
    ]
    assert score("regex", ["HELLO"], params={"pattern": "hello", "ignore_case": True}) == [1.0]
    completions = [
        "<think>\nsteps\n</think>\n<answer>4</answer>",
        "<answer>4</answer>",
        "Sure! <answer>4</answer>",
        "<answer>4</answer> and more",
    ]
    assert score("format", completions) == [1.0, 1.0, 0.0, 0.0]
    assert score("format", ["ABC", "ABCD"], params={"pattern": "[A-C]+"}) == [1.0, 0.0]


def test_json_valid():
    completions = ['{"a": 1, "b": 2}', '```json\n{"a": 1}\n```', "{a: 1}", "[1, 2]"]
    assert score("json_valid", completions) == [1.0, 1.0, 0.0, 1.0]
    assert score("json_valid", completions, params={"required_keys": ["a", "b"]}) == [1.0, 0.0, 0.0, 0.0]


def test_length_penalty():
    got = score("length_penalty", ["x" * 10, "x" * 15, "x" * 5, "x" * 40], params={"target": 10})
    assert got == [0.0, -0.5, -0.5, -1.0]
    assert score("length_penalty", ["x" * 5, "x" * 15], params={"target": 10, "over_only": True}) == [
        0.0,
        -0.5,
    ]
    words = score("length_penalty", ["one two three four"], params={"target": 2, "unit": "word"})
    assert words == [-1.0]
    tokens = score(
        "length_penalty", ["a", "b"], completion_ids=[[1, 2, 3], [1]], params={"target": 3, "unit": "token"}
    )
    assert tokens == [0.0, pytest.approx(-2 / 3)]
    with pytest.raises(ValueError):
        R.length_penalty(target=0)


@pytest.mark.parametrize(
    ("completion", "chosen"),
    [
        ("positive", "positive"),
        ("Positive.", "positive"),
        ("The review is clearly negative.", "negative"),
        ("negative, not positive", "negative"),  # starts with a label
        ("It is positive and negative", None),  # ambiguous
        ("<answer>negative</answer> though parts were positive", "negative"),
        ("The answer is: positive", "positive"),
        ("I can't tell", None),
        ("positively glowing", None),  # whole words only
    ],
)
def test_chosen_choice(completion, chosen):
    assert R.chosen_choice(completion, ["positive", "negative"]) == chosen


def test_chosen_choice_letters_and_nested_labels():
    assert R.chosen_choice("A fine question. The answer is (C).", ["A", "B", "C", "D"]) == "C"
    assert R.chosen_choice("B", ["A", "B", "C", "D"]) == "B"
    assert R.chosen_choice("very positive", ["positive", "very positive"]) == "very positive"


def test_choice_correct():
    params = {"choices": ["positive", "negative"]}
    got = score(
        "choice_correct",
        ["positive", "Negative!", "dunno"],
        target=["positive", "positive", "negative"],
        params=params,
    )
    assert got == [1.0, 0.0, 0.0]
    assert score("choice_correct", ["negative"], target=[1], params=params) == [
        1.0
    ]  # an index into the choices
    per_record = score("choice_correct", ["B"], target=["B"], choices=[["A", "B"]])
    assert per_record == [1.0]


def test_contains_keyword():
    completions = ["Paris is the capital of France", "Lyon"]
    assert score("contains_keyword", completions, params={"keywords": ["paris"]}) == [1.0, 0.0]
    both = {"keywords": ["paris", "france"], "mode": "all"}
    assert score("contains_keyword", ["paris only", "Paris, France"], params=both) == [0.0, 1.0]
    fraction = {"keywords": ["a", "B", "c", "d"], "mode": "fraction", "case_sensitive": True}
    assert score("contains_keyword", ["a b A"], params=fraction) == [0.25]
    assert score(
        "contains_keyword", ["x y"], must=[["y", "z"]], params={"column": "must", "mode": "fraction"}
    ) == [0.5]
    with pytest.raises(ValueError):
        R.contains_keyword()


# ---------------------------------------------------------------------------------------------------------------
# build_reward


def test_build_reward_weights_and_totals():
    reward = R.build_reward(
        [
            {"name": "numeric_match"},
            {"name": "format", "pattern": r".*#### \d+", "weight": 0.5},
            {"name": "length_penalty", "target": 100, "weight": 0.1},
        ]
    )
    assert reward.names == ["numeric_match", "format", "length_penalty"]
    completions = ["x" * 50 + " #### 7", "7"]
    scores = reward.score(["q", "q"], completions, target=["#### 7", "#### 7"])
    assert scores.per_function["numeric_match"] == [1.0, 1.0]
    assert scores.per_function["format"] == [1.0, 0.0]
    assert scores.total == pytest.approx([1.0 + 0.5 - 0.1 * 43 / 100, 1.0 - 0.1 * 99 / 100])
    assert reward(["q", "q"], completions, target=["#### 7", "#### 7"]) == scores.total  # a reward itself


def test_build_reward_none_scores_are_left_out_of_the_total():
    reward = R.build_reward(["numeric_match", {"name": "regex", "pattern": "a", "weight": 2}])
    scores = reward.score(["", ""], ["a", "b"], target=["no number", "no number"])
    assert math.isnan(scores.per_function["numeric_match"][0])
    assert scores.total == [2.0, 0.0]
    only_none = R.build_reward(["numeric_match"]).score([""], ["b"], target=["none"])
    assert math.isnan(only_none.total[0])


def test_build_reward_names_repeated_functions_apart():
    reward = R.build_reward([{"name": "regex", "pattern": "a"}, {"name": "regex", "pattern": "b"}])
    assert reward.names == ["regex", "regex_2"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([], "no reward functions"),
        ([{"name": "numeric_matc"}], "did you mean 'numeric_match'"),
        ([{"name": "regex", "patern": "x"}], "'patern' \\(did you mean 'pattern'\\?\\)"),
        ([{"name": "regex"}], "missing a required argument: 'pattern'"),
        ([{"name": "regex", "pattern": "("}], "not a valid regular expression"),
        ([{"name": "length_penalty", "target": 10, "unit": "bytes"}], "`unit` must be one of"),
        ([{"weight": 1}], "exactly one of `name`"),
        ([{"name": "regex", "pattern": "x", "weight": "high"}], "not a number"),
    ],
)
def test_build_reward_errors_name_the_spec(specs, message):
    with pytest.raises(HoneError, match=message) as err:
        R.build_reward(specs)
    assert err.value.where is not None and err.value.where.startswith("rewards")


def test_a_reward_that_returns_the_wrong_shape_is_named():
    reward = R.CombinedReward(["bad"], [lambda prompts, completions, **kw: [1.0]], [1.0])
    with pytest.raises(HoneError, match="'bad' returned 1 for 2 completions"):
        reward(["", ""], ["a", "b"])
    reward = R.CombinedReward(["bad"], [lambda prompts, completions, **kw: ["yes"]], [1.0])
    with pytest.raises(HoneError, match="not a number"):
        reward([""], ["a"])


# ---------------------------------------------------------------------------------------------------------------
# User rewards from a Python file


USER_FILE = textwrap.dedent(
    """
    CALLS = []

    def brevity(prompts, completions, **kwargs):
        return [-len(c) / 100 for c in completions]

    def uses_field(prompts, completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer)]

    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    def positional(prompts, answers, /, **kwargs):
        return [0.0] * len(answers)

    def think_format(completions, **kwargs):  # TRL's style: only what it uses, by name
        return [float(c.startswith("<think>")) for c in completions]
    """
)


@pytest.fixture
def task_dir(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    return tmp_path


def test_python_reward_loads_relative_to_the_task_folder(task_dir):
    reward = R.build_reward(
        [{"python": "my_rewards.py:brevity", "weight": 0.1}, {"python": "my_rewards.py:uses_field"}], task_dir
    )
    assert reward.names == ["brevity", "uses_field"]
    scores = reward.score(["p", "p"], ["12", "abcd"], answer=["12", "x"])
    assert scores.per_function["brevity"] == [-0.02, -0.04]
    assert scores.total == pytest.approx([0.1 * -0.02 + 1.0, 0.1 * -0.04])


def test_rewards_are_called_by_name_like_trl(task_dir):
    reward = R.build_reward([{"python": "my_rewards.py:think_format"}], task_dir)
    assert reward(["p", "p"], ["<think>x", "y"]) == [1.0, 0.0]


def test_python_reward_is_imported_once(task_dir):
    first = R.load_python_reward("my_rewards.py:brevity", task_dir)
    second = R.load_python_reward("my_rewards.py:brevity", task_dir)
    assert first is second


@pytest.mark.parametrize(
    ("reference", "message", "fix"),
    [
        ("missing.py:brevity", "reward file 'missing.py' not found", "relative to the task YAML"),
        ("my_rewards.py:brevty", "has no function 'brevty'", "did you mean 'brevity'"),
        ("my_rewards.py", "does not name a function", "my_rewards.py:function_name"),
        ("my_rewards.py:no_kwargs", "has the signature", "**kwargs"),
        ("my_rewards.py:positional", "has the signature", "**kwargs"),
        ("my_rewards.py:CALLS", "has no function 'CALLS'", "brevity"),
        ("broken.py:f", "importing broken.py failed: ModuleNotFoundError", "fix the error"),
    ],
)
def test_python_reward_errors(task_dir, reference, message, fix):
    with pytest.raises(HoneError, match=message) as err:
        R.build_reward([{"python": reference}], task_dir)
    assert fix in err.value.fix


def test_python_reward_rejects_extra_keys(task_dir):
    with pytest.raises(HoneError, match="unknown keys for a python reward: scale"):
        R.build_reward([{"python": "my_rewards.py:brevity", "scale": 2}], task_dir)


def test_trl_reward_functions_plug_in():
    rewards = pytest.importorskip("trl.rewards")
    reward = R.CombinedReward(["think"], [rewards.think_format_reward], [1.0])
    chats = [
        [{"role": "assistant", "content": "<think>ok</think>4"}],
        [{"role": "assistant", "content": "4"}],
    ]
    assert reward(["q", "q"], chats) == [1.0, 0.0]
