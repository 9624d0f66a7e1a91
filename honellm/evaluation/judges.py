"""Judges: a language model that scores answers, as a reward and as a metric, calibrated before it is trusted.

A judge is any model Hone can load (a name from `hone models`, a local folder, an artifact: its adapter and prompt
program apply) or an OpenAI-compatible endpoint (`http://127.0.0.1:8000/v1` from `hone serve`, vLLM, a hosted API).
It answers in one of two modes, with a configurable prompt:

- **pairwise**: "which answer is better, A or B?" -> P(A). Used both ways round and averaged (`prefer`), which
  cancels the judge's position bias in the verdict (Zheng et al., "Judging LLM-as-a-Judge",
  https://arxiv.org/abs/2306.05685, Sec. 3.4: swap and average).
- **pointwise**: "rate the answer from 1 to `scale` on the rubric" -> the expected rating over the rating tokens'
  probabilities, scaled to [0, 1] (G-Eval, https://arxiv.org/abs/2303.16634, Sec. 2.3: probability-weighted scores
  are finer and more stable than the sampled digit).

Both modes rest on one primitive, the log-probabilities of a few option tokens ("A"/"B", "1".."9") as the first
token of the judge's answer: a local model gives them from one forward (no sampling, no answer to parse); an endpoint
gives them through `logprobs`/`top_logprobs`, and where it returns none, the option its greedy answer starts with.

A small model is a poor judge as it comes; `hone align TASK --method judge` (honellm.reward.recipes.judge) trains one
on the task's preference pairs, asked exactly as `Judge` asks (`pairwise_conversations`, `LocalBackend.encode`,
`option_ids`). Its artifact records the prompt it was trained with (`trained_prompt`), and `Judge.load` uses it
unless the judge config sets those fields. An artifact's prompt program is never applied to a judge's conversation
(`LocalBackend`).

Before a judge becomes a reward, `calibrate` measures it on labelled preference pairs the user gives: agreement
with the labels, the position-bias rate (the share of pairs whose verdict flips with the order of the answers,
i.e. the judge picked a position, not an answer) and the length bias (how much more often it prefers the longer
answer than the labels do), with bootstrap intervals. `Calibration.check` refuses a judge below `min_agreement` or
above `max_position_bias` unless `force`.

`judge_win_rate` (a metric in honellm.evaluation.metrics, scored by the `judge` mode of honellm.evaluation.scoring:
`metric: judge_win_rate` with a `judge:` block in the task) generates the artifact's answers and reports the share
the judge prefers to the task's reference answers (ties count half), so that `hone compare` can rank methods on
open-ended tasks.

Why our own module rather than a library: the judge libraries of the field (TRL's experimental judges, OpenAI's
evals) call hosted APIs and parse sampled text; Hone's judges must run offline on local models and artifacts, use
option probabilities, and feed Hone's reward and metric registries.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from honellm.config import Config, validate
from honellm.errors import HoneError
from honellm.evaluation.bootstrap import bootstrap_ci

DEFAULT_SYSTEM = "You are a careful, impartial judge of answers to user requests."

DEFAULT_PAIRWISE = (
    "Which answer to the request is better? Judge by: {rubric}. Do not let the order of the answers or their "
    "length decide.\n\n[Request]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Reply with one letter: A or B."
)

DEFAULT_POINTWISE = (
    "Rate the answer to the request from 1 (worst) to {scale} (best). Judge by: {rubric}.\n\n[Request]\n{prompt}"
    "\n\n[Answer]\n{answer}\n\nReply with one digit from 1 to {scale}."
)


class JudgeConfig(Config):
    """A judge: which model answers, how it is asked, and the bar it must clear before it is used as a reward."""

    model: str = Field(description="a model name or folder, an artifact folder, or the base URL of an "
                                   "OpenAI-compatible endpoint (http://host:port/v1)")
    endpoint_model: str | None = Field(None, description="the model name sent to an endpoint (default: its first "
                                                         "listed model)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding an endpoint's API key")
    mode: Literal["pairwise", "pointwise"] = Field("pairwise", description="compare two answers, or rate one")
    rubric: str = Field("helpfulness, correctness and concision", description="what the judge judges by")
    scale: int = Field(5, ge=2, le=9, description="pointwise ratings run from 1 to this")
    system: str | None = Field(DEFAULT_SYSTEM, description="the judge's system prompt (None: no system turn)")
    pairwise_prompt: str = Field(DEFAULT_PAIRWISE, description="pairwise template: {rubric} {prompt} {a} {b}")
    pointwise_prompt: str = Field(DEFAULT_POINTWISE, description="pointwise template: {rubric} {scale} {prompt} "
                                                                 "{answer}")
    calibration: str | None = Field(None, description="labelled preference pairs to calibrate the judge on before "
                                                      "it is used: a prompt/chosen/rejected JSONL file, "
                                                      "builtin:NAME/SPLIT or TASK@SPLIT")
    calibration_limit: int | None = Field(200, ge=1, description="pairs of `calibration` used at most")
    min_agreement: float = Field(0.6, ge=0, le=1, description="refuse a judge agreeing less with the labels")
    max_position_bias: float = Field(0.5, ge=0, le=1, description="refuse a judge whose verdict flips with the "
                                                                  "answers' order on more pairs than this")
    force: bool = Field(False, description="use the judge even below the bars (its calibration is still logged)")
    batch_size: int = Field(8, ge=1, description="judge prompts per forward (local) or concurrent requests")
    max_prompt_tokens: int = Field(2048, ge=16, description="judge prompts are cut from the left to this length")
    timeout: float = Field(60.0, gt=0, description="seconds per endpoint request")


PAIRWISE_OPTIONS = ("A", "B")  # the pairwise judge's answers: the first answer shown is better, or the second
TRAINED_FIELDS = ("mode", "rubric", "system", "pairwise_prompt")  # what a judge artifact's manifest fixes


def trained_prompt(model: str) -> dict[str, Any]:
    """The `judge` block of a judge artifact's manifest (`hone.json`): the prompt it was trained with (`mode`,
    `rubric`, `system`, `pairwise_prompt`) and its calibration on the validation pairs; {} for any other model."""
    manifest = Path(model) / "hone.json"
    if model.startswith(("http://", "https://")) or not manifest.is_file():
        return {}
    try:
        block = json.loads(manifest.read_text(encoding="utf-8")).get("judge")
    except (OSError, ValueError):
        return {}  # a damaged manifest is reported where the artifact loads
    return dict(block) if isinstance(block, dict) else {}


def with_trained_prompt(config: JudgeConfig) -> JudgeConfig:
    """`config` with the trained prompt of its judge artifact in every field of `TRAINED_FIELDS` it leaves unset
    (pydantic's `model_fields_set`): a judge is asked as it was trained, unless the user says otherwise."""
    block = trained_prompt(config.model)
    update = {k: block[k] for k in TRAINED_FIELDS if k in block and k not in config.model_fields_set}
    return config.model_copy(update=update) if update else config


def judge_config(value: JudgeConfig | dict | str, *, where: str | None = None) -> JudgeConfig:
    """A JudgeConfig from a config, a dict (a task's `judge:` block) or a bare model name."""
    if isinstance(value, JudgeConfig):
        return value
    if isinstance(value, str):
        value = {"model": value}
    return validate(JudgeConfig, dict(value), source=where)


# ---------------------------------------------------------------------------------------------------------------
# Backends: log-probabilities of option tokens as the first token of the judge's answer


class LocalBackend:
    """A model Hone loads (name, folder or artifact): one forward per batch, the next-token log-softmax.

    An artifact's adapter or weights apply; its prompt program does not. The judge's conversation is complete as
    `Judge` builds it (its own system turn, then the pairwise or pointwise prompt): an artifact's program is the
    program of the task it was made for (another system message, demonstrations of that task), and putting it in
    front would give the judge two instructions (a judge artifact's program holds the judge's own system turn, which
    would then come twice). A judge artifact (`hone align TASK --method judge`) carries the prompt it was trained
    with in its manifest instead (`trained_prompt`), and `Judge.load` uses that.
    """

    def __init__(self, model_text: str, *, model=None, tokenizer=None, max_prompt_tokens: int = 2048,
                 batch_size: int = 8):
        if model is None:
            from honellm.artifact import Artifact

            model, tokenizer = Artifact.resolve(model_text).load_model()
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_tokens, self.batch_size = max_prompt_tokens, batch_size
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    def encode(self, messages: list[dict]) -> list[int]:
        """The token ids of a judge conversation up to where the judge's answer starts (the chat template's
        generation prompt), uncut: what the option tokens are read after (the judge recipe trains on exactly
        these, `honellm.reward.recipes.judge`)."""
        from honellm.data.chat import render_prompt

        text = render_prompt(self.tokenizer, messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict]) -> list[int]:
        return self.encode(messages)[-self.max_prompt_tokens:]

    def option_ids(self, options: Sequence[str]) -> list[int]:
        ids = []
        for option in options:
            encoded = self.tokenizer(option, add_special_tokens=False)["input_ids"]
            if not encoded:
                raise HoneError(f"the judge's tokenizer encodes option {option!r} as nothing")
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise HoneError(f"the judge's tokenizer gives options {list(options)} the same first token",
                            fix="use a judge model whose tokenizer splits these options apart")
        return ids

    def option_logprobs(self, conversations: list[list[dict]], options: Sequence[str]) -> np.ndarray:
        import torch

        wanted = torch.tensor(self.option_ids(options))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(conversations), self.batch_size):
            rows = [self._render(c) for c in conversations[start:start + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # left padding: every row's last token is the last column
                ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            # Only the last column's logits are read: transformers' `logits_to_keep` skips the LM head elsewhere
            # (a batch of 16 x 250 tokens would otherwise make 16 x 250 x vocabulary logits).
            keep = {"logits_to_keep": 1} if self._keeps_logits else {}
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=False, **keep).logits[:, -1].float()
            out.append(logits.log_softmax(-1)[:, wanted.to(device)].cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(options)))


class EndpointBackend:
    """An OpenAI-compatible `/v1/chat/completions`: one greedy token with its top log-probabilities."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, concurrency: int = 8, transport=None):
        import httpx

        self.base_url = base_url.rstrip("/")
        key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.model = model or self._first_model()
        self.concurrency = concurrency

    def _first_model(self) -> str:
        try:
            response = self.client.get("/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except Exception as err:  # noqa: BLE001 - any failure here means the endpoint is not usable
            raise HoneError(f"the judge endpoint {self.base_url} did not list a model ({err})",
                            fix="check the URL (it ends in /v1) and that the server runs, or set "
                                "judge.endpoint_model") from None

    def _ask(self, messages: list[dict], options: Sequence[str]) -> np.ndarray:
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": 20}
        response = self.client.post("/chat/completions", json=body)
        if response.status_code >= 400:
            raise HoneError(f"the judge endpoint answered {response.status_code}: {response.text[:300]}",
                            fix="check the endpoint, its model name and API key")
        choice = response.json()["choices"][0]
        found = np.full(len(options), -math.inf)
        content = ((choice.get("logprobs") or {}).get("content") or [])
        if content:
            for alt in content[0].get("top_logprobs") or [{"token": content[0]["token"],
                                                         "logprob": content[0]["logprob"]}]:
                token = alt["token"].strip()
                if token in options:
                    k = list(options).index(token)
                    found[k] = max(found[k], alt["logprob"])
        else:  # no log-probabilities: the option the greedy answer starts with
            text = (choice.get("message") or {}).get("content") or ""
            for k, option in enumerate(options):
                if text.strip().startswith(option):
                    found[k] = 0.0
                    break
        return found

    def option_logprobs(self, conversations: list[list[dict]], options: Sequence[str]) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            rows = list(pool.map(lambda c: self._ask(c, options), conversations))
        return np.stack(rows) if rows else np.zeros((0, len(options)))


def _normalised(logps: np.ndarray) -> np.ndarray:
    """Option log-probabilities -> probabilities over the options (uniform where the judge gave none of them)."""
    finite = np.where(np.isfinite(logps), logps, -1e9)
    top = finite.max(axis=1, keepdims=True)
    weights = np.exp(finite - top)
    weights = np.where(np.isfinite(logps).any(axis=1, keepdims=True), weights, 1.0)
    return weights / weights.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# The judge


class Judge:
    """Ask a judge (see the module docstring). `backend` has `option_logprobs(conversations, options)`."""

    def __init__(self, config: JudgeConfig, backend):
        self.config, self.backend = config, backend

    @classmethod
    def load(cls, config: JudgeConfig | dict | str, *, model=None, tokenizer=None, transport=None) -> Judge:
        """The judge of `config`. A judge artifact (`hone align TASK --method judge`) is asked with the prompt it
        was trained with (its manifest's `judge` block), except for the fields `config` sets itself."""
        config = with_trained_prompt(judge_config(config))
        if config.model.startswith(("http://", "https://")):
            backend = EndpointBackend(config.model, model=config.endpoint_model, api_key_env=config.api_key_env,
                                      timeout=config.timeout, concurrency=config.batch_size, transport=transport)
        else:
            backend = LocalBackend(config.model, model=model, tokenizer=tokenizer,
                                   max_prompt_tokens=config.max_prompt_tokens, batch_size=config.batch_size)
        return cls(config, backend)

    def _conversation(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return system + [{"role": "user", "content": text}]

    def pairwise_conversations(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[list[dict]]:
        """The judge's conversations asking whether `a` (shown first) or `b` is the better answer: its system turn
        (when set), then `pairwise_prompt` over the rubric, the request and the two answers."""
        c = self.config
        return [self._conversation(c.pairwise_prompt.format(rubric=c.rubric, prompt=p, a=x, b=y))
                for p, x, y in zip(prompts, a, b, strict=True)]

    def first_wins(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """P(answer A is better) with `a` shown first, one order only. Shapes: n -> (n,)."""
        conversations = self.pairwise_conversations(prompts, a, b)
        return _normalised(self.backend.option_logprobs(conversations, PAIRWISE_OPTIONS))[:, 0]

    def prefer(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """P(`first` is better than `second`), averaged over both orders (position bias cancels). (n,)."""
        forward = self.first_wins(prompts, first, second)
        backward = self.first_wins(prompts, second, first)
        return (forward + (1.0 - backward)) / 2.0

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """Pointwise: the expected rating (1..scale) scaled to [0, 1]. (n,)."""
        c = self.config
        conversations = [self._conversation(c.pointwise_prompt.format(rubric=c.rubric, scale=c.scale, prompt=p,
                                                                      answer=x))
                         for p, x in zip(prompts, answers, strict=True)]
        ratings = np.arange(1, c.scale + 1, dtype=np.float64)
        probs = _normalised(self.backend.option_logprobs(conversations, [str(int(r)) for r in ratings]))
        return (probs @ ratings - 1.0) / (c.scale - 1)


# ---------------------------------------------------------------------------------------------------------------
# Calibration on labelled pairs


@dataclass
class Calibration:
    """How a judge did on labelled pairs. Rates are shares of pairs; intervals are 95% bootstrap intervals."""

    pairs: int
    agreement: float
    agreement_ci: tuple[float, float]
    position_bias: float
    position_bias_ci: tuple[float, float]
    first_position_rate: float  # share of single-order verdicts that chose the answer shown first
    length_bias: float  # judge's longer-preferred rate minus the labels' longer-preferred rate
    judge_prefers_longer: float
    labels_prefer_longer: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def check(self, config: JudgeConfig, *, where: str | None = None) -> None:
        """Refuse the judge below `min_agreement` or above `max_position_bias`, unless `force`."""
        problems = []
        if self.agreement < config.min_agreement:
            problems.append(f"agreement with the labels {self.agreement:.2f} < min_agreement {config.min_agreement}")
        if self.position_bias > config.max_position_bias:
            problems.append(f"position bias {self.position_bias:.2f} > max_position_bias "
                            f"{config.max_position_bias}")
        if problems and not config.force:
            raise HoneError(f"the judge {config.model} failed calibration on {self.pairs} pairs: "
                            + "; ".join(problems), where=where,
                            fix="use a stronger judge, a clearer prompt or rubric, or set judge force=true to use "
                                "it anyway")


def calibrate(judge: Judge, pairs: Sequence[dict], *, seed: int = 0) -> Calibration:
    """Measure `judge` on `pairs` (dicts with prompt, chosen, rejected): both orders of every pair."""
    if not pairs:
        raise HoneError("no labelled pairs to calibrate the judge on", fix="give prompt/chosen/rejected records")
    prompts = [text_of(p["prompt"]) for p in pairs]
    chosen = [text_of(p["chosen"]) for p in pairs]
    rejected = [text_of(p["rejected"]) for p in pairs]
    forward = judge.first_wins(prompts, chosen, rejected)  # P(chosen) with chosen first
    backward = judge.first_wins(prompts, rejected, chosen)  # P(rejected) with rejected first
    debiased = (forward + (1.0 - backward)) / 2.0
    agree = np.where(debiased > 0.5, 1.0, np.where(debiased == 0.5, 0.5, 0.0))
    flips = ((forward > 0.5) == (backward > 0.5)).astype(float)  # same position both times: not the answer
    first = np.concatenate([forward > 0.5, backward > 0.5]).astype(float)
    longer_chosen = np.array([len(c) > len(r) for c, r in zip(chosen, rejected, strict=True)])
    differ = np.array([len(c) != len(r) for c, r in zip(chosen, rejected, strict=True)])
    judge_longer = np.where(longer_chosen, debiased > 0.5, debiased < 0.5)[differ].astype(float)
    labels_longer = longer_chosen[differ].astype(float)
    judge_rate = float(judge_longer.mean()) if differ.any() else math.nan
    label_rate = float(labels_longer.mean()) if differ.any() else math.nan
    return Calibration(
        pairs=len(pairs), agreement=float(agree.mean()), agreement_ci=bootstrap_ci(agree.tolist(), seed=seed),
        position_bias=float(flips.mean()), position_bias_ci=bootstrap_ci(flips.tolist(), seed=seed),
        first_position_rate=float(first.mean()), length_bias=judge_rate - label_rate,
        judge_prefers_longer=judge_rate, labels_prefer_longer=label_rate)


def read_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Labelled pairs from a JSONL file (prompt/chosen/rejected), with file:line errors."""
    path = Path(path)
    if not path.is_file():
        raise HoneError(f"calibration pairs not found: {path}", fix="give a JSONL file of prompt/chosen/rejected")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise HoneError(f"not JSON: {err.msg}", where=f"{path}:{number}", fix="one JSON object per line") \
                    from None
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise HoneError(f"a calibration pair lacks {', '.join(missing)}", where=f"{path}:{number}",
                                fix="each line needs prompt, chosen and rejected")
            pairs.append(record)
            if limit and len(pairs) >= limit:
                break
    return pairs


def pairs_as_text(pairs: Sequence) -> list[dict]:
    """A task's `PreferencePair`s as the prompt/chosen/rejected dicts of text a judge is given (a chat prompt or
    answer: its turns' contents, `text_of`)."""
    return [{"prompt": text_of(p.prompt), "chosen": text_of(p.chosen), "rejected": text_of(p.rejected)}
            for p in pairs]


def calibration_pairs(spec: str, *, base_dir: str | Path = ".", limit: int | None = None,
                      where: str | None = None) -> list[dict]:
    """The labelled pairs `spec` names (a judge config's `calibration`), as prompt/chosen/rejected dicts of text:

    - a JSONL file of prompt/chosen/rejected records (relative paths from `base_dir`, the task's folder);
    - `builtin:NAME/SPLIT`, Hone's built-in pairs (`builtin:support_prefs/validation`);
    - `TASK@SPLIT`, the preference pairs of a split of a task (a built-in task name or a task YAML, relative from
      `base_dir`): `support_prefs@validation`, `hh_rlhf.yaml@validation`.
    """
    if spec.startswith("builtin:"):
        from honellm.builtin import builtin_records

        records = builtin_records(spec[len("builtin:"):], where=where or "judge.calibration")
        for record in records[:1]:
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise HoneError(f"the built-in data {spec} are not preference pairs (no {', '.join(missing)})",
                                where=where, fix="name built-in pairs, e.g. builtin:support_prefs/validation")
        return [dict(r) for r in records[:limit]]
    if "@" in spec and not Path(base_dir, spec).is_file():
        from honellm.task import Task

        name, _, split = spec.rpartition("@")
        task_path = Path(base_dir) / name if (Path(base_dir) / name).is_file() else name
        return pairs_as_text(Task.load(task_path).pairs(split)[:limit])
    path = Path(spec)
    return read_pairs(path if path.is_absolute() else Path(base_dir) / path, limit)


def resolve_judge_model(model: str, base_dir: str | Path = ".") -> str:
    """A relative judge folder (an artifact, a model folder) from `base_dir`, the task's folder, where it is there
    (as the task's data paths resolve); a model name, an endpoint URL or a path found only from here unchanged."""
    if model.startswith(("http://", "https://")) or Path(model).is_absolute():
        return model
    found = Path(base_dir) / model
    if found.is_dir():
        return str(found.resolve())
    if model.startswith(("./", "../")) and not Path(model).is_dir():
        raise HoneError(f"the judge {model} is not there (looked in {found.resolve()} and {Path(model).resolve()})",
                        fix="train one first (`hone align TASK --method judge --out DIR` writes DIR/artifact), or "
                            "set judge.model to a model name, folder or endpoint")
    return model


def calibrated_judge(config: JudgeConfig | dict | str, *, base_dir: str | Path = ".", where: str | None = None,
                     **load) -> tuple[Judge, Calibration | None]:
    """Load a judge and, when its config names calibration pairs (`calibration_pairs`), calibrate it and apply
    the bars. Relative paths (the judge's folder, the pairs) resolve from `base_dir`."""
    config = judge_config(config, where=where)
    resolved = resolve_judge_model(config.model, base_dir)
    if resolved != config.model:  # keep which fields the user set (the trained prompt fills the others)
        config = config.model_copy(update={"model": resolved})
    judge = Judge.load(config, **load)
    if config.calibration is None:
        return judge, None
    pairs = calibration_pairs(config.calibration, base_dir=base_dir, limit=config.calibration_limit, where=where)
    calibration = calibrate(judge, pairs)
    calibration.check(config, where=where)
    return judge, calibration


_LAST_JUDGE: dict[tuple, tuple[Judge, Calibration | None]] = {}


def reused_judge(config: JudgeConfig | dict | str, *, base_dir: str | Path = ".",
                 where: str | None = None) -> tuple[Judge, Calibration | None]:
    """`calibrated_judge`, kept for the next call with the same config and folder (the last one only): a metric
    asks the same judge again for every method of a compare and at every evaluation of a training run, and
    loading and calibrating it each time would cost more than judging. A judge folder rewritten since (its
    hone.json's time) is loaded anew."""
    block = judge_config(config, where=where).model_dump(mode="json", exclude_unset=True)
    model = resolve_judge_model(block["model"], base_dir)
    manifest = Path(model) / "hone.json"
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
    key = (json.dumps(block, sort_keys=True), str(Path(base_dir).resolve()), stamp)
    if key not in _LAST_JUDGE:
        found = calibrated_judge(config, base_dir=base_dir, where=where)
        _LAST_JUDGE.clear()
        _LAST_JUDGE[key] = found
    return _LAST_JUDGE[key]


def text_of(value: Any) -> str:
    """A prompt or answer as text: a string, or a chat list (its messages' contents, one per line)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", ""))
    if isinstance(value, Sequence):
        return "\n".join(text_of(v) for v in value)
    return str(value)
