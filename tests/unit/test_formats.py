import pytest

from honellm.data.formats import (
    detect_format,
    detect_record_format,
    parse_transcript,
    render_template,
    split_implicit_pair,
    validate_record,
)
from honellm.data.readers import Record
from honellm.errors import HoneError

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Buy it."


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "preference-implicit"),
        ({"prompt": "p", "completion": "c", "label": True}, "unpaired-preference"),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"prompt": "p", "answer": "42"}, "reference"),
        ({"prompt": "p", "solution": "42"}, "reference"),
        ({"text": "t", "label": "positive"}, "fields"),
    ],
)
def test_detects_each_format(record, expected):
    assert detect_record_format(record) == expected


def test_majority_format_wins_over_a_broken_record():
    records = [Record({"prompt": "p", "chosen": "a", "rejected": "b"}) for _ in range(5)]
    records.append(Record({"prompt": "p", "rejected": "b"}))
    assert detect_format(records) == "preference"
    assert [p.field for p in validate_record(records[-1], "preference")] == ["chosen"]


def test_transcript_parsing_and_implicit_prompt_split():
    assert parse_transcript(HH_CHOSEN)[:2] == [{"role": "user", "content": "Hi there"},
                                              {"role": "assistant", "content": "Hello!"}]
    prompt, chosen, rejected = split_implicit_pair(HH_CHOSEN, HH_REJECTED)
    assert prompt[-1] == {"role": "user", "content": "How do I bake bread?"}
    assert len(prompt) == 3
    assert (chosen, rejected) == ("Mix flour and water.", "Buy it.")


def test_implicit_split_when_answers_share_their_first_words():
    a = "\n\nHuman: Q?\n\nAssistant: The answer is yes."
    b = "\n\nHuman: Q?\n\nAssistant: The answer is no."
    assert split_implicit_pair(a, b) == ([{"role": "user", "content": "Q?"}], "The answer is yes.", "The answer is no.")


def test_implicit_split_of_message_lists():
    base = [{"role": "user", "content": "q"}]
    pair = split_implicit_pair(base + [{"role": "assistant", "content": "good"}], base + [{"role": "assistant", "content": "bad"}])
    assert pair == (base, "good", "bad")
    assert split_implicit_pair("no markers here", "none here either") is None


@pytest.mark.parametrize(
    ("record", "fmt", "field", "message"),
    [
        ({"messages": []}, "chat", "messages", "non-empty"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "chat", "messages", "role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "chat", "messages", "last message"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "preference", "chosen", "non-empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "preference", "rejected", "identical"),
        ({"chosen": "no prefix", "rejected": "at all"}, "preference-implicit", "chosen", "share no prompt"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "unpaired-preference", "label", "true or false"),
        ({"instruction": "i"}, "alpaca", "output", "missing"),
    ],
)
def test_each_validation_error_names_its_field(record, fmt, field, message):
    problems = validate_record(Record(record, "f.jsonl:3"), fmt)
    assert problems, "expected a problem"
    assert problems[0].field == field
    assert message in problems[0].what
    assert problems[0].where == "f.jsonl:3"


def test_target_and_choice_validation():
    rec = Record({"text": "t", "label": "meh"}, "d.jsonl:9")
    problems = validate_record(rec, "fields", template="{text}", target="label", choices=["positive", "negative"])
    assert problems[0].field == "label" and "not one of the choices" in problems[0].what
    problems = validate_record(Record({"text": "t"}, "d.jsonl:2"), "fields", template="{text} {title}", target="label")
    assert {p.field for p in problems} == {"title", "label"}


def test_render_template_errors_name_the_missing_field():
    assert render_template("Review: {text}", {"text": "great"}) == "Review: great"
    with pytest.raises(HoneError, match=r"\{title\}"):
        render_template("{title}", {"text": "x"}, "d.jsonl:4")
