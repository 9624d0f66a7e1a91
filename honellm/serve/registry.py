"""Which models the server answers for, and how they share loaded weights.

Each command-line argument becomes one served model, addressed by name:

- an artifact folder is named by its manifest name (`hone.json` "name", e.g. `sst2-lora`): artifact folders are
  all called `artifact/` inside their run folders, so the folder name would collide;
- a plain model (`smollm2-135m-instruct`, a hub id, a local model folder) serves the base model as it is, named
  by the text given, or by the folder name for a local path;
- `NAME=PATH` names it explicitly. Two models with one name are refused at start-up, with this fix.

Models are grouped into engines, one per set of loaded weights: every adapter (and every plain or prompt-only
artifact) on the same base model shares ONE loaded base. The adapters are loaded into one `PeftModel` under
internal names; a request activates its adapter with `set_adapter`, and the base itself runs inside
`disable_adapter()`. Only the engine's worker thread touches the model, so a switch and the generation it serves
are never interleaved with another request's (see `scheduler`). Adapters of different PEFT types (LoRA and IA3,
say) cannot live in one `PeftModel`, so each type gets its own engine; full-weight artifacts get their own too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.runtime.apply import DemonstrationPicker, chat_messages, demonstration_picker
from honellm.runtime.best_of_n import inference_generator

# PEFT methods that add virtual tokens in PeftModel.forward; the generation engine runs the base model's own
# modules, so it cannot apply them.
PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "ADAPTION_PROMPT"}


@dataclass(eq=False)
class Engine:
    """One set of loaded weights, its tokenizer and its generator; served models point at it.

    `tokenizer` belongs to the worker thread (the generator encodes with it). Request handlers render and count
    prompts with `_counter`, a private copy behind a lock: a fast tokenizer mutates its Rust state on every call
    (padding and truncation settings) and raises "Already borrowed" when two threads share one.
    """

    key: str
    model: Any
    tokenizer: Any
    generator: Any
    context_length: int
    has_adapters: bool = False
    description: str = ""
    _counter: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self._counter is None:
            self._counter = copy.deepcopy(self.tokenizer)

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Make `adapter` the one that runs (None: the base model with every adapter off). Worker thread only."""
        if not self.has_adapters:
            yield
            return
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        # inference_mode=True keeps the adapter's weights frozen (set_adapter would otherwise mark them trainable).
        self.model.set_adapter(adapter, inference_mode=True)
        yield

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt of a conversation; `tools` (checked function specs) are offered through the chat template,
        or described in the system prompt when the template has no tool support (see `serve.tools`)."""
        from honellm.data.chat import render_prompt
        from honellm.serve.tools import render_with_tools, uses_tools

        with self._lock:
            if uses_tools(messages, tools):
                return render_with_tools(self._counter, messages, tools)
            return render_prompt(self._counter, messages)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs)."""
        with self._lock:
            return [self._counter.decode([i], skip_special_tokens=False) for i in ids]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes: a byte-level BPE token may hold part of a UTF-8 character, which its text
        shows as U+FFFD; its bytes are exact (OpenAI's `bytes` field), else its text encoded."""
        from honellm.generation.text import token_bytes

        with self._lock:
            return token_bytes(self._counter, ids)

    def count(self, text: str) -> int:
        """Tokens of `text` as the generator will encode it (no special tokens added: prompts are formatted)."""
        with self._lock:
            return len(self._counter(text, add_special_tokens=False)["input_ids"])


@dataclass(eq=False)
class ServedModel:
    """One name clients can ask for: an artifact (or a plain base model) on an engine."""

    name: str
    source: str  # what was given on the command line
    artifact: Artifact
    engine: Engine
    adapter: str | None = None  # the internal PEFT adapter name; None runs the base with adapters off
    picker: DemonstrationPicker | None = None
    created: int = 0
    # the engine's generator with the artifact's inference settings applied (best-of-n): honellm.runtime
    generator: Any = None

    def chat_messages(self, messages: list[dict]) -> list[dict]:
        """The artifact's prompt program applied to a chat request: its system prompt and demonstrations first.

        With a per-query selector, the demonstrations are chosen for the last user message."""
        return chat_messages(self.artifact.program, self.picker, messages)

    def describe(self) -> dict:
        """The `/v1/models` entry: OpenAI's fields plus what Hone knows about the model."""
        art = self.artifact
        return {
            "id": self.name, "object": "model", "created": self.created, "owned_by": "hone",
            "root": art.base_model, "parent": None,
            "hone": {"kind": art.kind if art.path else "base", "method": art.manifest.method,
                     "base_model": art.base_model, "path": str(art.path) if art.path else None,
                     "adapter": self.adapter is not None, "engine": self.engine.description},
        }


# ------------------------------------------------------------------------------------------------------- naming


def parse_spec(text: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); anything else -> (None, text). A path that exists is never split."""
    if "=" in text and not Path(text).exists():
        name, _, source = text.partition("=")
        if name and source and "/" not in name:
            return name, source
        raise HoneError(f"cannot read {text!r} as NAME=PATH", where="hone serve",
                        fix="write NAME=PATH with a name without '/', e.g. sentiment=runs/sst2/lora-1/artifact")
    return None, text


def default_name(source: str, artifact: Artifact) -> str:
    if artifact.path is not None:
        return artifact.name
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return source


# ------------------------------------------------------------------------------------------------------- loading


@dataclass
class _Entry:
    name: str
    source: str
    artifact: Artifact
    peft_type: str | None = None


def resolve_models(specs: list[str]) -> list[_Entry]:
    """Read every artifact (checking its base model's hash) and name it; no weights are loaded here."""
    if not specs:
        raise HoneError("nothing to serve", where="hone serve", fix="pass an artifact folder or a model name")
    entries: list[_Entry] = []
    for spec in specs:
        name, source = parse_spec(spec)
        artifact = Artifact.resolve(source)
        entry = _Entry(name or default_name(source, artifact), source, artifact)
        if artifact.kind == "reward_model":
            raise HoneError("a reward model scores text and does not generate it", where=source,
                            fix="serve the policy artifact instead")
        if artifact.adapter_dir is not None and artifact.weights_dir is None:
            entry.peft_type = _peft_type(artifact.adapter_dir)
        entries.append(entry)
    seen: dict[str, _Entry] = {}
    for entry in entries:
        if entry.name in seen:
            raise HoneError(f"two models would be served as {entry.name!r}: {seen[entry.name].source} and {entry.source}",
                            where="hone serve",
                            fix=f"name them: hone serve {entry.name}-a={seen[entry.name].source} "
                                f"{entry.name}-b={entry.source}")
        seen[entry.name] = entry
    return entries


def _peft_type(adapter_dir: Path) -> str:
    try:
        peft_type = json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"]
    except (OSError, ValueError, KeyError) as err:
        raise HoneError(f"the adapter has no readable adapter_config.json ({err})", where=str(adapter_dir),
                        fix="re-create the artifact") from None
    if peft_type in PROMPT_LEARNING:
        raise HoneError(f"the server's generation engine cannot run {peft_type} adapters (virtual tokens)",
                        where=str(adapter_dir), fix="serve a LoRA-family, IA3, LoHa or LoKr adapter")
    return peft_type


def plan_engines(entries: list[_Entry]) -> dict[tuple, list[_Entry]]:
    """Group entries by the weights they need: (base id, PEFT type) for adapters, the folder for full weights.

    Plain and prompt-only entries join an adapter engine of their base when there is one (they run with adapters
    disabled), so serving a base next to its adapters costs no second copy of the weights."""
    plan: dict[tuple, list[_Entry]] = {}
    for entry in entries:
        art = entry.artifact
        if art.weights_dir is not None:
            key: tuple = ("weights", str(art.weights_dir.resolve()))
        else:
            key = ("base", art.base_model, entry.peft_type)
        plan.setdefault(key, []).append(entry)
    for key in [k for k in plan if k[0] == "base" and k[2] is None]:
        host = next((k for k in plan if k[0] == "base" and k[1] == key[1] and k[2] is not None), None)
        if host is not None:
            plan[host].extend(plan.pop(key))
    return plan


def load_models(specs: list[str], *, dtype: str = "auto", device: str | None = None, batch_size: int = 16,
                generator_factory: Callable[..., Any] | None = None) -> list[ServedModel]:
    """Resolve, name and load every model; adapters on one base share one loaded base (see the module doc)."""
    import time

    from honellm.models import load

    entries = resolve_models(specs)
    served: list[ServedModel] = []
    created = int(time.time())
    for key, group in plan_engines(entries).items():
        first = group[0].artifact
        if key[0] == "weights":
            model, tokenizer = load(first.weights_dir, dtype=dtype, device=device)
        else:
            model, tokenizer = load(first.base_model, dtype=dtype, device=device)
        adapters: dict[int, str] = {}
        for i, entry in enumerate(group):
            if entry.peft_type is None:
                continue
            internal = f"a{len(adapters)}"  # PEFT names become module keys: keep them plain
            with warnings.catch_warnings():  # transformers' deprecation notices on PEFT's calls are not ours to fix
                warnings.simplefilter("ignore", FutureWarning)
                if not adapters:
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(model, entry.artifact.adapter_dir, adapter_name=internal)
                else:
                    model.load_adapter(entry.artifact.adapter_dir, adapter_name=internal)
            adapters[i] = internal
        model.eval()
        # One adapter alone on its engine is merged into the engine's weights (base speed); several entries
        # switch adapters between batches, and each switch would rebuild the merged copy: run them unmerged.
        engine = _make_engine(key, model, tokenizer, bool(adapters), batch_size, generator_factory,
                              merge_adapters=len(group) == 1)
        for i, entry in enumerate(group):
            served.append(ServedModel(entry.name, entry.source, entry.artifact, engine, adapters.get(i),
                                      demonstration_picker(entry.artifact, model, tokenizer), created,
                                      inference_generator(entry.artifact, engine.generator)))
    order = {e.name: i for i, e in enumerate(entries)}
    return sorted(served, key=lambda s: order[s.name])


def _make_engine(key: tuple, model, tokenizer, has_adapters: bool, batch_size: int,
                 generator_factory: Callable[..., Any] | None, *, merge_adapters: bool = True) -> Engine:
    if generator_factory is None:
        from honellm.generation.engine import Generator

        # The torch engine reads the live modules, so adapter switches take effect; vLLM would not see them.
        generator = Generator(model, tokenizer, backend="torch" if has_adapters else "auto", batch_size=batch_size,
                              merge_adapters=merge_adapters)
    else:
        generator = generator_factory(model, tokenizer, batch_size=batch_size)
    what = f"{key[1]} + {key[2]} adapters" if key[0] == "base" and key[2] else str(key[1])
    # The generator's max_length is the context it enforces (prompt + completion).
    return Engine("/".join(str(k) for k in key if k), model, tokenizer, generator, int(generator.max_length),
                  has_adapters, what)
