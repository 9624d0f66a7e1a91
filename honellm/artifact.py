"""Artifact: what every method produces, and what evaluate, compare, serve and export consume.

```
my-artifact/
  hone.json      manifest: base model id + content hash, method, kind, resolved config, metrics, cost, versions
  prompt.json    the prompt program (system, demonstrations or selector, template, calibration)
  pool.jsonl     demonstration pool for per-query selection (optional)
  adapter/       a PEFT adapter in the standard PEFT format (optional)
  model/         full weights, safetensors only, with tokenizer (optional)
  ...            method extras (e.g. a reward model's scalar head)
```

A plain model name plus a task is the zero-shot artifact (`Artifact.zero_shot`), so every command that takes
an artifact also takes a model name.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from honellm.atomic import atomic_dir, atomic_write_json
from honellm.errors import HoneError
from honellm.program import InferenceSettings, PromptProgram

FORMAT_VERSION = 1
KINDS = ("prompt", "adapter", "full", "reward_model")


class BaseModelRef(BaseModel):
    id: str
    hash: str


class Manifest(BaseModel):
    """`hone.json`. Unknown keys are kept (newer Hone versions may add some)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    method: str
    kind: str = "prompt"
    base_model: BaseModelRef
    task: dict[str, Any] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""
    run_dir: str | None = None
    inference: InferenceSettings | None = None  # how it answers at inference (honellm.runtime applies it)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("honellm", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class Artifact:
    """A honed model: a base model reference, a prompt program, and optionally an adapter or full weights."""

    def __init__(self, manifest: Manifest, program: PromptProgram, path: Path | None = None):
        self.manifest = manifest
        self.program = program
        self.path = path

    # ------------------------------------------------------------------------------------------ creating

    @classmethod
    def create(cls, *, name: str, method: str, base_model: str, program: PromptProgram, kind: str = "prompt",
               task=None, config: dict | None = None, metrics: dict | None = None, cost: dict | None = None,
               run_dir: str | None = None) -> Artifact:
        """A new in-memory artifact for `base_model` (its content hash is computed now)."""
        from honellm.models import model_id_and_hash

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        model_id, model_hash = model_id_and_hash(base_model)
        manifest = Manifest(
            name=name, method=method, kind=kind, base_model=BaseModelRef(id=model_id, hash=model_hash),
            task=task_reference(task) if task is not None else None, config=config or {}, metrics=metrics or {},
            cost=cost or {}, versions=library_versions(), created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            run_dir=run_dir,
        )
        return cls(manifest, program)

    @classmethod
    def zero_shot(cls, model: str, task=None) -> Artifact:
        """The zero-shot artifact of a model on a task: the task's system message and template, nothing trained."""
        program = PromptProgram.from_task(task) if task is not None else PromptProgram()
        return cls.create(name=f"zero-shot:{model}", method="zero-shot", base_model=model, program=program, task=task)

    @classmethod
    def resolve(cls, text: str | Path, task=None) -> Artifact:
        """An artifact folder, or a model name/path (then the zero-shot artifact on `task`)."""
        path = Path(text)
        if (path / "hone.json").exists():
            return cls.load(path)
        if path.is_dir() and not (path / "config.json").exists():
            raise HoneError("not an artifact (no hone.json) nor a model folder (no config.json)", where=str(path),
                            fix="pass an artifact written by hone prompt/tune/align, or a model name from `hone models`")
        return cls.zero_shot(str(text), task)

    # ------------------------------------------------------------------------------------------ saving

    def save(self, path: str | Path, *, force: bool = False, model=None, tokenizer=None,
             extra_files: dict[str, str | Path | bytes] | None = None, pool: list[dict] | None = None) -> Path:
        """Write the artifact atomically. `model` is a PeftModel (its adapter is saved) or a full model (its weights
        are saved as safetensors, with `tokenizer`). Refuses to overwrite without `force`."""
        path = Path(path)
        if path.exists() and not force:
            raise HoneError("the artifact folder already exists", where=str(path),
                            fix="choose another --out, or pass --force to replace it")
        with atomic_dir(path, overwrite=True) as tmp:
            if model is not None:
                if _is_peft(model):
                    model.save_pretrained(tmp / "adapter", safe_serialization=True)
                    if self.manifest.kind == "prompt":
                        self.manifest.kind = "adapter"
                else:
                    model.save_pretrained(tmp / "model", safe_serialization=True)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp / "model")
                    self.manifest.kind = "full" if self.manifest.kind == "prompt" else self.manifest.kind
            for name, content in (extra_files or {}).items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                elif Path(content).is_dir():
                    shutil.copytree(content, target)
                else:
                    shutil.copy2(content, target)
            if pool is not None:
                with open(tmp / "pool.jsonl", "w", encoding="utf-8") as handle:
                    for record in pool:
                        handle.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
            atomic_write_json(tmp / "prompt.json", self.program.model_dump(mode="json"))
            atomic_write_json(tmp / "hone.json", self.manifest.model_dump(mode="json"))
        self.path = path
        return path

    def update_manifest(self, **fields) -> None:
        """Change manifest fields (e.g. metrics after evaluation) and rewrite hone.json atomically."""
        for key, value in fields.items():
            setattr(self.manifest, key, value)
        if self.path is not None:
            atomic_write_json(self.path / "hone.json", self.manifest.model_dump(mode="json"))

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, *, verify_base: bool = True) -> Artifact:
        """Read an artifact; with `verify_base`, refuse it unless the base model found has the recorded hash."""
        path = Path(path)
        manifest_path = path / "hone.json"
        if not manifest_path.exists():
            raise HoneError("not a Hone artifact (no hone.json)", where=str(path),
                            fix="pass a folder written by hone prompt/tune/align")
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_text())
            program_path = path / "prompt.json"
            program = (PromptProgram.model_validate_json(program_path.read_text())
                       if program_path.exists() else PromptProgram())
        except ValueError as err:
            raise HoneError(f"the artifact's manifest is damaged: {err}", where=str(manifest_path),
                            fix="re-create the artifact") from None
        if manifest.format_version > FORMAT_VERSION:
            raise HoneError(f"artifact format {manifest.format_version} is newer than this Hone understands",
                            where=str(path), fix="upgrade honellm")
        artifact = cls(manifest, program, path)
        if verify_base:
            artifact.verify_base()
        return artifact

    def verify_base(self) -> None:
        from honellm.models import model_id_and_hash

        ref = self.manifest.base_model
        _, found = model_id_and_hash(ref.id)
        if found != ref.hash:
            raise HoneError(
                f"base model mismatch: the artifact was made on {ref.id} with hash {ref.hash}, "
                f"but the model found there has hash {found}",
                where=str(self.path),
                fix="load it against the same base model it was trained on (same weights), or re-run the method",
            )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def base_model(self) -> str:
        return self.manifest.base_model.id

    @property
    def adapter_dir(self) -> Path | None:
        return self.path / "adapter" if self.path and (self.path / "adapter").is_dir() else None

    @property
    def weights_dir(self) -> Path | None:
        return self.path / "model" if self.path and (self.path / "model").is_dir() else None

    def pool(self) -> list[dict]:
        """The demonstration pool saved for per-query selection (empty when none)."""
        if not self.path or not (self.path / "pool.jsonl").exists():
            return []
        with open(self.path / "pool.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def load_model(self, dtype: str = "auto", device: str | None = None, *, trainable: bool = False):
        """`(model, tokenizer)` ready to run: the base model plus this artifact's adapter or full weights."""
        from honellm.models import load

        if self.weights_dir is not None:
            return load(self.weights_dir, dtype=dtype, device=device)
        model, tokenizer = load(self.base_model, dtype=dtype, device=device)
        if self.adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter_dir, is_trainable=trainable)
            if not trainable:
                model.eval()
        return model, tokenizer

    # ------------------------------------------------------------------------------------------ describing

    def describe(self) -> dict:
        m = self.manifest
        return {
            "name": m.name, "path": str(self.path) if self.path else None, "method": m.method, "kind": m.kind,
            "base_model": m.base_model.id, "base_hash": m.base_model.hash,
            "task": (m.task or {}).get("name"), "created_at": m.created_at,
            "system": self.program.system, "template": self.program.template,
            "demonstrations": len(self.program.demonstrations),
            "selector": self.program.selector.model_dump() if self.program.selector else None,
            "calibrated": self.program.calibration is not None,
            "metrics": m.metrics, "cost": m.cost, "config": m.config, "versions": m.versions,
        }


def task_reference(task) -> dict:
    return {"name": task.name, "source": task.source, "config": task.config.model_dump(mode="json")}


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)
