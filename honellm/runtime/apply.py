"""`ArtifactRuntime`: an artifact applied to a loaded model, the one way every command runs an artifact.

`evaluate` (hone eval, compare, the recipes' validation), `hone serve` and `hone export` all go through here, so
the same request gets the same answer wherever the artifact runs:

- `generator`: the model's `Generator`, wrapped as the manifest's `inference` block asks (best-of-n), and as tool
  episodes where the task lists tools;
- `demonstrations(records)`: per-query demonstrations for task records (the evaluator's path);
- `picker()` / `chat_messages(messages)`: the same selection for a chat request (the server's path);
- `query(record)`: the user turn a record becomes under the artifact's program (what selection keys on).

The prompt program and inference settings are data (honellm/program.py); this module applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.generation import Generator
from honellm.generation.tools import ToolEnvironment, ToolGenerator, load_tools
from honellm.program import Demonstration
from honellm.runtime.best_of_n import inference_generator
from honellm.runtime.selectors import build_selector, query_text, select_demonstrations
from honellm.task import Task

# (query text) -> the demonstrations to show for it
DemonstrationPicker = Callable[[str], list[Demonstration]]


@dataclass
class ArtifactRuntime:
    """`artifact` on `model`/`tokenizer` for `task`; `generator` is what answers (inference settings applied)."""

    artifact: Artifact
    task: Task | None
    model: Any
    tokenizer: Any
    generator: Any
    _picker: DemonstrationPicker | None = field(default=None, repr=False)

    @classmethod
    def load(cls, artifact: Artifact, task: Task | None = None, *, model=None, tokenizer=None, generator=None,
             batch_size: int = 16) -> ArtifactRuntime:
        """Load the artifact's model (unless `model` is given: a training loop's, adapter attached) and wrap its
        generator as the artifact's inference settings ask. `generator` reuses one already built (the server
        shares one per loaded base)."""
        if model is None:
            model, tokenizer = artifact.load_model()
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        if generator is None:
            generator = Generator(model, tokenizer, batch_size=batch_size)
        generator = inference_generator(artifact, generator, task=task)
        if task is not None and task.config.tools:  # tool episodes: the answer is each episode's final text
            tools = load_tools(task.config.tools, task.base_dir, where=f"{task.source} (tools)")
            generator = ToolGenerator(generator, ToolEnvironment(tools, tokenizer, max_turns=task.config.tool_turns))
        return cls(artifact, task, model, tokenizer, generator)

    # ------------------------------------------------------------------------------------ task records

    def query(self, record: dict) -> str:
        """The user turn `record` becomes under the artifact's program."""
        return query_text(self.task, self.artifact.program, record)

    def demonstrations(self, records: list, *, seed: int = 0, pool: list[dict] | None = None,
                       encoder=None) -> list[list[Demonstration]] | None:
        """Per-query demonstrations for each record from the artifact's pool (`pool` gives the pool of an
        artifact not saved yet); None when the program's demonstrations are fixed."""
        spec = self.artifact.program.selector
        if spec is None or not spec.per_query:
            return None
        pool = pool if pool is not None else self.artifact.pool()
        if not pool:
            raise HoneError(f"the prompt program selects demonstrations per query ({spec.name}), but the artifact "
                            "has no demonstration pool", where=self._where(),
                            fix="re-create the artifact with `hone prompt` (it saves pool.jsonl beside the program)")
        return select_demonstrations(spec, self.task, self.artifact.program, records, pool, model=self.model,
                                     tokenizer=self.tokenizer, seed=seed, encoder=encoder)

    # ------------------------------------------------------------------------------------ chat requests

    def picker(self) -> DemonstrationPicker | None:
        """`(query text) -> demonstrations`, selecting per query as `demonstrations` does; None when fixed."""
        if self._picker is None:
            self._picker = demonstration_picker(self.artifact, self.model, self.tokenizer, task=self.task)
        return self._picker

    def chat_messages(self, messages: list[dict]) -> list[dict]:
        """The artifact's program applied to a chat request: its system prompt and demonstrations first; with a
        per-query selector, the demonstrations chosen for the last user message."""
        return chat_messages(self.artifact.program, self.picker(), messages)

    def _where(self) -> str:
        return str(self.artifact.path) if self.artifact.path else self.artifact.name


def chat_messages(program, picker: DemonstrationPicker | None, messages: list[dict]) -> list[dict]:
    """`program` applied to a chat request; `picker` (if any) chooses demonstrations for the last user message."""
    demonstrations = None
    if picker is not None:
        demonstrations = picker(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    return program.chat_messages(messages, demonstrations)


def demonstration_picker(artifact: Artifact, model=None, tokenizer=None, *, task: Task | None = None,
                         seed: int = 0) -> DemonstrationPicker | None:
    """Per-query demonstration selection for chat requests: None when the program's demonstrations are fixed.

    An artifact whose program selects demonstrations per query carries a selector spec, its pool (pool.jsonl) and
    the task's config in its manifest; embedding selectors embed with `model` unless the spec names an embedding
    model. `seed` is the evaluator's default, so a served artifact shows the demonstrations `hone eval` scored.
    """
    spec = artifact.program.selector
    if spec is None or not spec.per_query:
        return None
    where = str(artifact.path) if artifact.path else artifact.name
    pool = artifact.pool()
    config = (artifact.manifest.task or {}).get("config")
    if not pool or (task is None and not config):
        raise HoneError("this artifact picks demonstrations per query but has no demonstration pool or task config",
                        where=where, fix="re-create it with `hone prompt` (it saves pool.jsonl and the task)")
    task = task if task is not None else Task.from_config(config)
    return build_selector(spec, pool, task=task, program=artifact.program, model=model, tokenizer=tokenizer,
                          seed=seed)
