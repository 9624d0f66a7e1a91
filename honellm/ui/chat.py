"""Chat with artifacts side by side: the same conversation to each, answered as `hone serve` would answer it.

The models are loaded through the server's registry (`honellm.serve.registry.load_models`), so an artifact's
prompt program (system prompt, demonstrations, per-query selector) and chat template are applied exactly as on
`hone serve`, and adapters on one base share one loaded base. One set is kept loaded (the last one asked for);
generation runs one request at a time under a lock, in the caller's thread (the app calls it from a worker).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from honellm.errors import HoneError

MAX_SIDES = 2
MAX_NEW_TOKENS = 512


class ChatPool:
    def __init__(self, *, dtype: str = "auto", device: str | None = None):
        self.dtype, self.device = dtype, device
        self._key: tuple[str, ...] | None = None
        self._models: list = []
        self._lock = threading.Lock()

    def _load(self, artifacts: list[Path]) -> list:
        from honellm.serve.registry import load_models

        key = tuple(str(p) for p in artifacts)
        if key != self._key:
            self._models, self._key = [], None  # drop the old set before loading the new one
            # NAME=PATH keeps two sides apart even when both are the same artifact.
            self._models = load_models([f"side{i}={p}" for i, p in enumerate(artifacts)], dtype=self.dtype,
                                       device=self.device, batch_size=1)
            self._key = key
        return self._models

    def chat(self, artifacts: list[Path], messages: list[dict], *, max_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0) -> list[dict]:
        """Each artifact's answer to `messages` (OpenAI-style role/content dicts), in the order given."""
        from honellm.generation.params import SamplingParams

        if not 1 <= len(artifacts) <= MAX_SIDES:
            raise HoneError(f"chat takes 1 to {MAX_SIDES} artifacts, not {len(artifacts)}", where="chat",
                            fix="pick one artifact for each side")
        if not messages or messages[-1].get("role") != "user":
            raise HoneError("the conversation must end with a user message", where="chat", fix="type a message")
        if not 1 <= max_tokens <= MAX_NEW_TOKENS:
            raise HoneError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS}", where="chat", fix="lower it")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                seed=seed if temperature > 0 else None)
        answers = []
        with self._lock:
            models = self._load(artifacts)
            for path, served in zip(artifacts, models, strict=True):
                prompt = served.engine.render(served.chat_messages(messages))
                started = time.perf_counter()
                with served.engine.use(served.adapter):
                    completion = served.engine.generator.generate([prompt], params)[0]
                answers.append({"artifact": str(path), "name": served.artifact.name, "text": completion.text,
                                "finish_reason": completion.finish_reason,
                                "completion_tokens": completion.completion_tokens,
                                "prompt_tokens": completion.prompt_tokens,
                                "seconds": round(time.perf_counter() - started, 3)})
        return answers

    def close(self) -> None:
        with self._lock:
            self._models, self._key = [], None
