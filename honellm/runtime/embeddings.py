"""Sentence embeddings for nearest-neighbour demonstration selection, offline.

Two sources, both mean-pooled hidden states, L2-normalised (so a dot product is the cosine):
- a local embedding model (`embedding_model: /path/to/model`, loaded with `AutoModel`; never downloaded);
- by default the base model itself: one hidden layer of the causal LM. A middle layer is the default because
  the last layers of a causal LM specialise in predicting the next token, while middle layers carry more of the
  sentence's meaning (Jiang et al. 2023, "Scaling Sentence Embeddings with LLMs", and the probing literature).

A `TextEncoder` caches vectors by text, so the prompt search embeds the pool once for all its candidates. Texts
missing from the cache are encoded together in a fixed order (by length), so the same texts always give the
same vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from honellm.errors import HoneError


class TextEncoder:
    """`encoder(texts) -> (n, d)` L2-normalised float32 vectors, from a model's mean-pooled hidden states."""

    def __init__(self, model, tokenizer, *, layer: int | None = None, batch_size: int = 32, max_length: int = 256):
        self.model, self.tokenizer = model, tokenizer
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        # hidden_states has n_layers + 1 entries (the embeddings first); default to the middle layer
        self.layer = layer if layer is not None else (n_layers // 2 if n_layers else -1)
        self.batch_size, self.max_length = batch_size, max_length
        self.cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> TextEncoder:
        """An encoder from a local embedding model folder (a sentence-transformers or BERT-style HF model)."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").exists():
            raise HoneError("the embedding model must be a local Hugging Face model folder (with config.json)",
                            where=str(path), fix="give a local folder, or leave embedding_model unset to use the "
                                                 "base model's own hidden states")
        model = AutoModel.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, layer=kwargs.pop("layer", -1), **kwargs)

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self.cache}, key=lambda t: (len(t), t))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for text, vector in zip(chunk, self._encode(chunk), strict=True):
                self.cache[text] = vector
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "right"
        try:
            batch = tok([t or " " for t in texts], return_tensors="pt", padding=True, truncation=True,
                        max_length=self.max_length, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = self.model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[self.layer].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)
