"""Turning generated token ids into text while they arrive: stop strings and streaming deltas.

Decoding a completion on its own loses a leading space with SentencePiece tokenizers (Llama 2, Mistral: the
decoder strips the first "▁"), so a completion is decoded after a few tokens of its prompt and that context's
text is cut off again (what vLLM's incremental detokenizer does with its prefix offset). Byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, SmolLM) give the same text either way.
"""

from __future__ import annotations

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
