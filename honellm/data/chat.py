"""Chat formatting: turn messages into the exact text a model expects, with and without a chat template.

`render_prompt` gives the text up to where the assistant's answer starts (the generation prompt);
`render_answer` gives the answer text as the template writes it, end-of-turn token included, so that
prompt + answer is exactly what the template renders for the whole conversation. Training on
`render_answer`'s tokens teaches the model to end its turn.

Base models without a chat template get a plain layout: the system text, then `User:`/`Assistant:` turns.
Chat templates that refuse a system turn (Mistral's and Gemma's older ones raise on it) get the system text folded
into the first user turn, separated by a blank line, as those models' own documentation does; every rendering goes
through `render_messages`, so prompts, answers and shared prefixes agree on the layout.
"""

from __future__ import annotations

from honellm.errors import HoneError

PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def accepts_system(tokenizer) -> bool:
    """Whether the chat template renders a system turn (tried once per template text, then remembered)."""
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _ACCEPTS_SYSTEM:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _ACCEPTS_SYSTEM[key] = True
        except Exception:  # noqa: BLE001 - templates raise what they like (jinja's TemplateError, ValueError...)
            _ACCEPTS_SYSTEM[key] = False
    return _ACCEPTS_SYSTEM[key]


_ACCEPTS_SYSTEM: dict[str, bool] = {}


def fold_system(messages: list[dict]) -> list[dict]:
    """The leading system turn(s) folded into the first user turn ("system text\n\nuser text").

    With no user turn to carry it (a system message alone), the system text becomes a user turn of its own.
    """
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return messages
    for i, message in enumerate(rest):
        if message["role"] == "user":
            folded = {**message, "content": "\n\n".join([*system, message["content"]])}
            return [*rest[:i], folded, *rest[i + 1:]]
    return [{"role": "user", "content": "\n\n".join(system)}, *rest]


def render_messages(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages` (the system turn folded where the template refuses one)."""
    if not accepts_system(tokenizer):
        messages = fold_system(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - a template's own refusal (jinja TemplateError and friends)
        roles = ", ".join(m["role"] for m in messages)
        raise HoneError(f"the model's chat template refused the conversation ({roles}): {err}",
                        where="the tokenizer's chat_template",
                        fix="check the roles of the data's turns against what the model accepts, or set the "
                            "tokenizer's chat_template") from None


def build_messages(system: str | None, demonstrations: list[tuple[str, str]], turns: list[dict]) -> list[dict]:
    """system + demonstrations as user/assistant turns + the conversation to answer."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    for query, answer in demonstrations:
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": answer})
    for turn in turns:
        if turn["role"] == "system":
            if messages and messages[0]["role"] == "system":
                continue  # the program's system message wins over one carried by the data
            messages.insert(0, turn)
            continue
        messages.append(turn)
    return messages


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text of `messages` followed by the generation prompt (where the assistant's answer begins)."""
    if has_chat_template(tokenizer):
        return render_messages(tokenizer, messages, add_generation_prompt=True)
    return _plain(messages, tokenizer) + PLAIN_ASSISTANT


def render_answer(tokenizer, messages: list[dict], answer: str) -> str:
    """The answer as the chat template writes it after `render_prompt(messages)`, end-of-turn included."""
    if not has_chat_template(tokenizer):
        return f" {answer}{tokenizer.eos_token or ''}"
    prompt = render_prompt(tokenizer, messages)
    full = render_messages(tokenizer, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise HoneError(
            "the model's chat template renders a conversation differently from its prefix (it edits earlier turns)",
            fix="set a plain template (prompt.template) or use a model whose chat template is prefix-stable",
        )
    return full[len(prompt):].rstrip("\n") if full.endswith("\n") and not answer.endswith("\n") else full[len(prompt):]


def render_conversation(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    """The whole conversation's text: with `generation_prompt`, `render_prompt`; without, every turn as written
    (the layout `render_answer` cuts an answer from)."""
    if generation_prompt:
        return render_prompt(tokenizer, messages)
    if has_chat_template(tokenizer):
        return render_messages(tokenizer, messages, add_generation_prompt=False)
    return _plain(messages, tokenizer)


def end_of_turn(tokenizer) -> str:
    """The text that ends an assistant turn ('<|im_end|>' for ChatML models; the eos token otherwise)."""
    if has_chat_template(tokenizer):
        probe = render_answer(tokenizer, [{"role": "user", "content": "x"}], "y")
        tail = probe.split("y", 1)[1] if "y" in probe else ""
        tail = tail.strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


def _plain(messages: list[dict], tokenizer) -> str:
    parts = []
    for message in messages:
        if message["role"] == "system":
            parts.append(f"{message['content']}\n\n")
        elif message["role"] == "user":
            parts.append(f"{PLAIN_USER}{message['content']}\n")
        else:
            parts.append(f"{PLAIN_ASSISTANT} {message['content']}{tokenizer.eos_token or ''}\n")
    return "".join(parts)
