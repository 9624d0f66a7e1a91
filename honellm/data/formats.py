"""Record formats: detect which one a data file uses, validate each record, and turn records into examples.

Formats (detected from the fields of the records; the most common match wins and every record is then
validated against it, so one broken record is reported, not mistaken for another format):

| format              | fields                                              | becomes           |
|---------------------|-----------------------------------------------------|-------------------|
| chat                | messages: [{role, content}, ...]                    | SFT example       |
| preference          | prompt, chosen, rejected                            | preference pair   |
| preference-implicit | chosen, rejected (whole transcripts sharing a prefix) | preference pair |
| unpaired-preference | prompt, completion, label (bool)                    | unpaired example  |
| alpaca              | instruction, input (optional), output               | SFT example       |
| prompt-completion   | prompt, completion                                  | SFT example       |
| reference           | prompt, answer (or reference / solution / ground_truth) | prompt + reference |
| fields              | any fields a task template names, plus the target   | SFT example       |
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from honellm.data.readers import Record
from honellm.errors import HoneError, Problem

ROLES = ("system", "user", "assistant", "tool")
REFERENCE_FIELDS = ("answer", "reference", "solution", "ground_truth")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    kind: str  # "sft" | "preference" | "unpaired" | "reference" -- what the records can train
    template: str | None  # default template for the user turn; None where the record carries messages
    target: str | None  # default target field
    describe: str

    def matches(self, keys: set[str]) -> bool:
        return all(k in keys for k in self.required)


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


# Order matters for detection: the first (most specific) match wins for a record.
register_format(Format("chat", ("messages",), "sft", None, None, "chat messages [{role, content}]"))
register_format(Format("preference", ("prompt", "chosen", "rejected"), "preference", "{prompt}", None, "prompt/chosen/rejected"))
register_format(Format("preference-implicit", ("chosen", "rejected"), "preference", None, None,
                       "chosen/rejected transcripts sharing a prompt prefix"))
register_format(Format("unpaired-preference", ("prompt", "completion", "label"), "unpaired", "{prompt}", "completion",
                       "prompt/completion/label (unpaired preference)"))
register_format(Format("alpaca", ("instruction", "output"), "sft", None, "output", "instruction/input/output (Alpaca)"))
register_format(Format("prompt-completion", ("prompt", "completion"), "sft", "{prompt}", "completion", "prompt/completion"))
register_format(Format("reference", ("prompt",), "reference", "{prompt}", None, "prompt + reference answer"))
register_format(Format("fields", (), "sft", None, None, "task fields through the task's template"))


def detect_record_format(record: dict) -> str:
    keys = set(record)
    for fmt in FORMATS.values():
        if fmt.name == "reference" and not keys & set(REFERENCE_FIELDS):
            continue
        if fmt.name != "fields" and fmt.matches(keys):
            return fmt.name
    return "fields"


def detect_format(records: list[Record]) -> str:
    """The format most records have (broken records are then reported against it)."""
    if not records:
        return "fields"
    counts = Counter(detect_record_format(r) for r in records)
    return counts.most_common(1)[0][0]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_template(template: str, record: dict, where: str = "?") -> str:
    try:
        return template.format_map(_StrictFields(record))
    except KeyError as err:
        raise HoneError(
            f"the prompt template uses field {{{err.args[0]}}} which this record lacks (fields: {', '.join(record)})",
            where=where,
            fix="fix the template in the task YAML (prompt.template), or add the field to the data",
        ) from None
    except (ValueError, IndexError) as err:
        raise HoneError(f"the prompt template is not a valid format string: {err}", where="prompt.template",
                        fix="use {field} placeholders; write {{ and }} for literal braces") from None


class _StrictFields(dict):
    def __missing__(self, key):
        raise KeyError(key)


# ------------------------------------------------------------------------------------------------ examples


@dataclass
class Example:
    """One supervised (or prompt-only) example: the conversation so far and the answer to learn or predict."""

    messages: list[dict]  # user/assistant turns up to the answer; a system turn only if the data carries one
    target: str | None
    record: Record = field(repr=False)


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages up to the compared answer
    chosen: str
    rejected: str
    record: Record = field(repr=False)


@dataclass
class UnpairedExample:
    prompt: list[dict]
    completion: str
    desirable: bool
    record: Record = field(repr=False)


def parse_transcript(text: str) -> list[dict]:
    """Turn an HH-RLHF transcript (`\\n\\nHuman: ... \\n\\nAssistant: ...`) into chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    messages = []
    # re.split with a group yields [before, role, content, role, content, ...]
    for role, content in zip(parts[1::2], parts[2::2], strict=False):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def split_implicit_pair(chosen, rejected) -> tuple[list[dict], str, str] | None:
    """Split two transcripts (strings or message lists) that share a prompt into (prompt, chosen, rejected)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
            return None
        if chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
            return None
        return list(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)  # the last assistant marker inside the shared part
    if cut == -1:
        return None
    head = chosen[: cut + len(ASSISTANT)]
    prompt = parse_transcript(head[: -len(ASSISTANT)])
    if not prompt:
        return None
    return prompt, chosen[len(head):].strip(), rejected[len(head):].strip()


# ------------------------------------------------------------------------------------------------ validation


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_messages(value, where: str, fld: str, need_final_assistant: bool) -> list[Problem]:
    if not isinstance(value, list) or not value:
        return [Problem(where, "must be a non-empty list of {role, content} messages", fld)]
    problems = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            problems.append(Problem(where, f"message {i} must be an object with 'role' and 'content'", fld))
        elif message["role"] not in ROLES:
            problems.append(Problem(where, f"message {i} has role {message['role']!r}; use one of {', '.join(ROLES)}", fld))
        elif not isinstance(message["content"], str):
            problems.append(Problem(where, f"message {i} content must be a string", fld))
    if not problems and need_final_assistant and value[-1]["role"] != "assistant":
        problems.append(Problem(where, "the last message must be the assistant's answer to learn", fld))
    return problems


def validate_record(record: Record, fmt: str, *, template: str | None = None, target: str | None = None,
                    choices: list[str] | None = None, need_target: bool = True) -> list[Problem]:
    """Every problem with one record under format `fmt`; an empty list means it is usable."""
    where = record.where
    spec = FORMATS[fmt]
    problems = [Problem(where, "missing required field", k) for k in spec.required if k not in record]
    if problems:
        return problems
    if fmt == "chat":
        problems += _check_messages(record["messages"], where, "messages", need_final_assistant=need_target)
    elif fmt in ("preference", "preference-implicit"):
        for key in ("chosen", "rejected"):
            value = record[key]
            if isinstance(value, list):
                problems += _check_messages(value, where, key, need_final_assistant=True)
            elif not _is_text(value):
                problems.append(Problem(where, "must be a non-empty string or a list of messages", key))
        if fmt == "preference" and not (_is_text(record["prompt"]) or isinstance(record["prompt"], list)):
            problems.append(Problem(where, "must be a non-empty string or a list of messages", "prompt"))
        if not problems and fmt == "preference-implicit" and split_implicit_pair(record["chosen"], record["rejected"]) is None:
            problems.append(Problem(where, "chosen and rejected share no prompt prefix ending in an assistant turn",
                                    "chosen"))
        if not problems and record["chosen"] == record["rejected"]:
            problems.append(Problem(where, "chosen and rejected are identical", "rejected"))
    elif fmt == "unpaired-preference" and not isinstance(record["label"], bool):
        problems.append(Problem(where, f"must be true or false, found {record['label']!r}", "label"))
    if template is not None and fmt not in ("chat", "preference-implicit"):
        missing = [f for f in template_fields(template) if f not in record]
        problems += [Problem(where, "field used by the prompt template is missing", f) for f in missing]
    if need_target and target is not None and fmt not in ("chat",) and spec.kind in ("sft", "reference"):
        if target not in record:
            problems.append(Problem(where, "missing target field", target))
        elif record[target] is None or (isinstance(record[target], str) and not record[target].strip()):
            problems.append(Problem(where, "target is empty", target))
        elif choices and str(record[target]) not in choices:
            problems.append(Problem(where, f"target {record[target]!r} is not one of the choices {choices}", target))
    return problems


def default_target(fmt: str, record_keys: set[str] | None = None) -> str | None:
    if fmt == "reference":
        keys = record_keys or set()
        return next((k for k in REFERENCE_FIELDS if k in keys), "answer")
    return FORMATS[fmt].target


def default_template(fmt: str) -> str | None:
    return FORMATS[fmt].template


def alpaca_query(record: dict) -> str:
    extra = record.get("input") or ""
    return f"{record['instruction']}\n\n{extra}".strip() if extra.strip() else str(record["instruction"])


QueryFn = Callable[[dict], str]
