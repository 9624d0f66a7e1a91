"""What an artifact carries besides weights: its prompt program and its inference settings (data, typed).

The prompt program is how a record becomes the messages a model sees: system instruction + demonstrations (fixed,
or selected per query from a pool) + the query rendered from the record. Every Artifact carries one, so prompting
and tuning stack: an adapter trained with a prompt program is evaluated and served with the same program.

The inference settings (`InferenceSettings`, the manifest's `inference` block) say how answers are produced at
inference, e.g. best-of-n with the reward that picks the answer.

These are plain pydantic models at the bottom of the layers (the artifact reads and writes them);
`honellm.runtime` applies them, the same way for evaluate, serve, export and compare.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from honellm.config import Config
from honellm.data.chat import build_messages
from honellm.data.formats import render_template


class Demonstration(Config):
    query: str = Field(description="the user turn of the demonstration")
    answer: str = Field(description="the assistant turn of the demonstration")


class SelectorSpec(Config):
    name: str = Field(description="example selector name (see honellm.runtime.selectors)")
    k: int = Field(4, ge=0, description="demonstrations per query")
    per_query: bool = Field(True, description="select for each query (True) or once for all queries (False)")
    params: dict[str, Any] = Field(default_factory=dict, description="selector options")


class PromptProgram(Config):
    system: str | None = Field(None, description="system message; None keeps the model's default")
    template: str | None = Field(None, description="user-turn template over record fields; None uses the task's")
    demonstrations: list[Demonstration] = Field(default_factory=list, description="fixed demonstrations, in order")
    selector: SelectorSpec | None = Field(None, description="per-query demonstration selection from the artifact's pool")
    calibration: dict[str, float] | None = Field(
        None, description="per-choice log-probability offsets added before the argmax (see runtime/calibration.py)")
    calibration_method: str | None = Field(None, description="how the offsets were estimated: content_free or batch")

    @classmethod
    def from_task(cls, task) -> PromptProgram:
        """The zero-shot program of a task: its system message and template, no demonstrations."""
        return cls(system=task.config.prompt.system, template=task.config.prompt.template)

    def query(self, task, record: dict) -> str:
        """The user turn for `record`: this program's template if it has one, else the task's rendering."""
        if self.template:
            return render_template(self.template, record, getattr(record, "where", "?"))
        return task.query(record)

    def turns(self, task, record: dict) -> list[dict]:
        """The conversation to answer (without system and demonstrations)."""
        if self.template or task.format not in ("chat", "preference", "preference-implicit", "unpaired-preference"):
            return [{"role": "user", "content": self.query(task, record)}]
        return task.messages(record)

    def messages(self, task, record: dict, demonstrations: list[Demonstration] | None = None) -> list[dict]:
        """The whole conversation the model sees for `record`.

        `demonstrations` overrides the fixed ones (per-query selection passes the selected ones here).
        """
        demos = self.demonstrations if demonstrations is None else demonstrations
        return build_messages(self.system, [(d.query, d.answer) for d in demos], self.turns(task, record))

    def chat_messages(self, messages: list[dict], demonstrations: list[Demonstration] | None = None) -> list[dict]:
        """Apply this program to a chat request (the server's path): system and demonstrations go first."""
        demos = self.demonstrations if demonstrations is None else demonstrations
        return build_messages(self.system, [(d.query, d.answer) for d in demos], messages)

    def shared_prefix_messages(self) -> list[dict]:
        """The messages every query shares (system + fixed demonstrations): the generation engine caches their
        KV once. Empty when demonstrations are chosen per query."""
        if self.selector is not None and self.selector.per_query:
            return build_messages(self.system, [], [])
        return build_messages(self.system, [(d.query, d.answer) for d in self.demonstrations], [])


class BestOfNSettings(Config):
    """Best-of-n at inference: sample `n` answers and return the one the reward scores highest."""

    n: int = Field(4, ge=1, description="answers sampled per request")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the n answers")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of the n answers")
    task_rewards: bool = Field(True, description="score the answers with the task's reward functions")
    reward_model: str | None = Field(None, description="a reward-model artifact folder scoring the answers")
    reward_model_weight: float = Field(1.0, description="weight of the reward model's score")


class InferenceSettings(Config):
    """The manifest's `inference` block: how the artifact answers at inference (evaluate and serve apply it)."""

    best_of_n: BestOfNSettings | None = Field(None, description="best-of-n sampling; None: one answer per request")
    uses_references: bool = Field(False, description="the reward reads the reference answer (then the score is "
                                                     "pass@n, an upper bound a server cannot reach)")
    policy: str | None = Field(None, description="name of the artifact the answers are sampled from")
