"""A reward model: a language model's backbone with a scalar head, trained on preference pairs (Bradley-Terry).

    rm = load_reward_model("runs/hh_rlhf/reward_model-.../artifact")
    rm.score([[{"role": "user", "content": "How do I pick a lock?"}]] * 2,
             ["I can't help with that.", "Sure: first, ..."])          # -> [1.7, -0.9]

`RewardModel` is an `nn.Module`: `forward(input_ids, attention_mask) -> [B]` scores for right-padded token batches
(what the training recipe and a PPO/GRPO loop on tokens call), and `score(prompts, completions) -> list[float]`
for conversations and answer texts (batched, length-sorted, no gradient). The score is the head applied to the
final hidden state of the sequence's LAST real token, which is the end-of-turn token the chat template writes
after the answer (`honellm.data.chat.render_answer`): the model reads the whole prompt and answer before it
scores (InstructGPT's reward model; TRL's `AutoModelForSequenceClassification` pools the same token).

`score` applies the reward model's own prompt program (the system message it was trained with) to the prompts
it is given, so a policy trained under another system message is still scored the way the reward model learnt;
pass `apply_program=False` for conversations already laid out with it (as `hone eval` does).

On disk a reward model is an Artifact of kind "reward_model": the backbone as a PEFT adapter (`adapter/`) or full
weights (`model/`), plus `reward_head.safetensors` (the head's weight, [1, hidden]) and `reward_model.json`
(pooling, max_length, and the mean and standard deviation of the scores on the validation answers, which
`score(normalize=True)` uses to return rewards of mean 0 and standard deviation 1 on that data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from honellm.errors import HoneError
from honellm.training.batching import TokenSequence, collate, encode_conversation
from honellm.training.precision import Precision

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward_model.json"


def new_head(hidden_size: int) -> nn.Linear:
    """A scalar head, no bias (a constant shift changes no Bradley-Terry probability), std 1/sqrt(hidden + 1)
    as in Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325), so initial scores are O(1)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    nn.init.normal_(head.weight, std=1 / np.sqrt(hidden_size + 1))
    return head


class RewardModel(nn.Module):
    """`model` (a causal LM, or a PeftModel of one) read up to its final hidden states, and a scalar `head`.

    The LM head is never run. Under the bf16 policy the backbone runs in autocast and the head in fp32.
    """

    def __init__(self, model, tokenizer, head: nn.Linear | None = None, *, program=None, max_length: int = 1024,
                 precision: Precision | None = None, stats: dict | None = None):
        super().__init__()
        from honellm.program import PromptProgram

        self.model = model
        self.head = head if head is not None else new_head(model.config.hidden_size)
        self.tokenizer = tokenizer
        self.program = program if program is not None else PromptProgram()
        self.max_length = max_length
        self.precision = precision if precision is not None else _precision_of(model)
        self.stats = dict(stats or {})

    # ------------------------------------------------------------------------------------------ tensors

    def backbone(self) -> nn.Module:
        """The decoder without its LM head (e.g. `LlamaModel`), adapter layers included."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] (fp32) of right-padded sequences [B, T]: the head at each row's last real token."""
        hidden = self.backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        with torch.autocast(hidden.device.type, enabled=False):  # the head and the score in fp32
            return self.head(pooled.float()).squeeze(-1)

    # ------------------------------------------------------------------------------------------ text

    def encode(self, messages: list[dict], completion: str, *, apply_program: bool = True) -> TokenSequence:
        """Tokens of the conversation + answer as the chat template writes them (truncated to `max_length`)."""
        if apply_program:
            messages = self.program.chat_messages(messages)
        return encode_conversation(self.tokenizer, messages, completion, max_length=self.max_length)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], completions: list[str], *, batch_size: int = 16,
              apply_program: bool = True, normalize: bool = False) -> list[float]:
        """One reward per (conversation, answer): `prompts[i]` is the message list up to the answer,
        `completions[i]` the answer text. Batched by similar lengths; no gradient; the module's mode is kept.

        `normalize` subtracts the mean and divides by the standard deviation measured on validation answers
        at training time (see `stats`).
        """
        if len(prompts) != len(completions):
            raise HoneError(f"{len(prompts)} prompts but {len(completions)} completions", where="RewardModel.score",
                            fix="pass one completion per prompt (repeat a prompt for several completions)")
        sequences = [self.encode(p, c, apply_program=apply_program) for p, c in zip(prompts, completions, strict=True)]
        return self.score_sequences(sequences, batch_size=batch_size, normalize=normalize)

    @torch.no_grad()
    def score_sequences(self, sequences: list[TokenSequence], *, batch_size: int = 16,
                        normalize: bool = False, desc: str = "") -> list[float]:
        """Scores of already tokenized sequences (what `score` does after `encode`); a progress bar named `desc`
        when given."""
        from honellm.progress import progress

        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        scores = np.zeros(len(sequences))
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        bar = progress(total=len(sequences), desc=desc, unit="seq", leave=False, disable=None if desc else True)
        try:
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                batch = collate([sequences[i] for i in index], self.tokenizer.pad_token_id).to(device)
                with self.precision.autocast():
                    scores[index] = self(batch.input_ids, batch.attention_mask).double().cpu().numpy()
                bar.update(len(index))
        finally:
            bar.close()
            self.train(was_training)
        if normalize:
            if "score_mean" not in self.stats:
                raise HoneError("this reward model has no score statistics to normalise with",
                                fix="score with normalize=False, or retrain it with a validation split")
            scores = (scores - self.stats["score_mean"]) / max(self.stats["score_std"], 1e-6)
        return scores.tolist()

    def reward_function(self, *, normalize: bool = False, batch_size: int = 16):
        """This model as a reward function `(prompts, completions, **columns) -> list[float]` (the convention of
        `honellm.reward.functions`): prompts are message lists (a string is one user turn), completions texts or
        chat message lists (the last message's content is scored)."""
        from honellm.reward.functions import completion_text

        def reward_model(prompts, completions, **columns) -> list[float]:
            messages = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
            return self.score(messages, [completion_text(c) for c in completions], batch_size=batch_size,
                              normalize=normalize)

        return reward_model

    # ------------------------------------------------------------------------------------------ files

    def head_files(self) -> dict[str, bytes]:
        """`reward_head.safetensors` and `reward_model.json`, for `Artifact.save(extra_files=...)`."""
        from safetensors.torch import save

        weight = self.head.weight.detach().to("cpu", torch.float32).contiguous()
        info = {"pooling": "last_token", "hidden_size": int(weight.shape[1]), "max_length": self.max_length,
                **self.stats}
        return {HEAD_FILE: save({"weight": weight}), INFO_FILE: json.dumps(info, indent=2).encode()}

    @classmethod
    def from_artifact(cls, artifact, model=None, tokenizer=None, *, device: str | None = None,
                      dtype: str = "auto") -> RewardModel:
        """The reward model of a saved artifact; `model`/`tokenizer` reuse a backbone already loaded from it."""
        if artifact.kind != "reward_model" or artifact.path is None:
            raise HoneError(f"not a saved reward model (kind {artifact.kind})",
                            where=str(artifact.path) if artifact.path else artifact.name,
                            fix="pass an artifact written by `hone align --method reward_model`")
        path = Path(artifact.path)
        if not (path / HEAD_FILE).exists():
            raise HoneError(f"the reward model has no {HEAD_FILE}", where=str(path), fix="re-create the artifact")
        if model is None:
            model, tokenizer = artifact.load_model(dtype=dtype, device=device)
        from safetensors.torch import load_file

        weight = load_file(path / HEAD_FILE)["weight"]
        info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).exists() else {}
        head = nn.Linear(weight.shape[1], 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        head.to(next(model.parameters()).device)
        stats = {k: info[k] for k in ("score_mean", "score_std") if k in info}
        rm = cls(model, tokenizer, head, program=artifact.program, max_length=int(info.get("max_length", 1024)),
                 stats=stats)
        return rm.eval()


def _precision_of(model) -> Precision:
    """Inference precision from how the weights are stored: bf16 weights run under bf16 autocast, fp32 ones in fp32
    (a model loaded with dtype="fp32" is scored in fp32, as asked)."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    return Precision(torch.bfloat16 if param.dtype == torch.bfloat16 else torch.float32, param.device.type)


def load_reward_model(artifact, *, device: str | None = None, dtype: str = "auto") -> RewardModel:
    """A trained reward model from its artifact (an `Artifact` or its folder), ready to `score`."""
    from honellm.artifact import Artifact

    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    return RewardModel.from_artifact(artifact, device=device, dtype=dtype)


