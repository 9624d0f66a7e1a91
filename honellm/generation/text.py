"""Turning generated token ids into text while they arrive: stop strings and streaming deltas.

Decoding a completion on its own loses a leading space with SentencePiece tokenizers (Llama 2, Mistral: the
decoder strips the first "▁"), so a completion is decoded after a few tokens of its prompt and that context's
text is cut off again (what vLLM's incremental detokenizer does with its prefix offset). Byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, SmolLM) give the same text either way.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"  # what decode() gives for an incomplete UTF-8 byte sequence
CONTEXT_TOKENS = 4


class CompletionText:
    """The text of one completion: decoded on demand, checked for stop strings, streamed without broken UTF-8."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.context_text = self._decode(self.context) if self.context else ""
        self.stop = stop
        self.stop_at: int | None = None  # where the first stop string begins in the text
        self.checked = 0  # text before this index holds no stop string
        self.emitted = 0  # characters already handed out by `delta`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def text_of(self, ids: list[int]) -> str:
        """The text of the generated `ids`, as it reads after the prompt."""
        if not self.context:
            return self._decode(ids)
        full = self._decode(self.context + ids)
        if full.startswith(self.context_text):
            return full[len(self.context_text):]
        return self._decode(ids)  # the context did not end on a character boundary: decode alone

    def hits_stop(self, ids: list[int]) -> bool:
        """Whether the text of `ids` now contains a stop string; remembers where the earliest one begins."""
        if not self.stop or self.stop_at is not None:
            return self.stop_at is not None
        text = self.text_of(ids)
        longest = max(len(s) for s in self.stop)
        start = max(0, self.checked - longest + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.stop_at = min(found)
            return True
        # Trailing replacement characters may still turn into real ones: look at them again next time.
        self.checked = len(text.rstrip(REPLACEMENT))
        return False

    def final(self, ids: list[int]) -> str:
        """The completion's text: everything generated, cut before the first stop string."""
        text = self.text_of(ids)
        if self.stop and self.stop_at is None:
            self.hits_stop(ids)
        return text[: self.stop_at] if self.stop_at is not None else text

    def delta(self, ids: list[int], finished: bool) -> str:
        """The text not yet handed out that is safe to hand out now.

        While generating, it holds back an incomplete UTF-8 character and any tail that could be the start of a
        stop string (it may have to be trimmed). Once `finished`, it hands out the rest of `final(ids)`, so the
        deltas always concatenate to the final text.
        """
        if finished:
            text = self.final(ids)
        else:
            text = self.text_of(ids)
            if self.stop_at is not None:
                text = text[: self.stop_at]
            text = text.rstrip(REPLACEMENT)
            text = text[: len(text) - self._possible_stop_start(text)]
        if len(text) <= self.emitted:
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-k:]):
                    best = k
                    break
        return best


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: byte-level BPE vocabularies spell every byte as one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The exact bytes of each token: byte-level BPE pieces (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece
    byte-fallback pieces (`<0xE2>`) hold parts of UTF-8 characters, which their decoded text cannot show.
    Special tokens, and pieces of other vocabularies, give their decoded text's UTF-8."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(getattr(tokenizer, "all_special_ids", ()))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    out = []
    for token_id, piece in zip(ids, pieces, strict=True):
        if piece is None or token_id in special:
            out.append(tokenizer.decode([token_id], skip_special_tokens=False).encode())
        elif byte_level and all(ch in _BYTE_LEVEL for ch in piece):
            out.append(bytes(_BYTE_LEVEL[ch] for ch in piece))
        elif _BYTE_FALLBACK.match(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        elif not byte_level and piece.startswith("▁"):
            out.append((" " + piece[1:]).replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([token_id], skip_special_tokens=False).encode())
    return out
