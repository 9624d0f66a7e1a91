"""Export an artifact for use without Hone.

- `merged`: a standalone Hugging Face model folder (safetensors weights, config, tokenizer with its chat template,
  generation config): the base model with the adapter folded into its weights, or a full fine-tune's weights.
  `AutoModelForCausalLM.from_pretrained(folder)` gives the same outputs as base + adapter (tested).
- `adapter`: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors) with the base model named
  by its hub id where Hone knows it, which `PeftModel.from_pretrained` and vLLM's `--enable-lora` load.

- `gguf`: one GGUF file per quantisation for llama.cpp, Ollama and LM Studio, plus an Ollama `Modelfile` with the
  artifact's system prompt, demonstrations and sampling parameters (see `honellm.export_gguf`).

All write `hone-export.json` (where the export came from) and a README with the prompt the model was tuned with:
a tuned model expects the artifact's system message and template, which a plain model folder cannot carry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from honellm.artifact import Artifact
from honellm.atomic import atomic_dir
from honellm.errors import HoneError
from honellm.export_gguf import (
    _chat_template,
    _file_stem,
    _source_config,
    check_quants,
    modelfile_text,
    supported_architecture,
    write_gguf,
)

FORMATS = ("merged", "adapter", "gguf")
VLLM_LORA_TYPES = ("LORA",)


def export_artifact(artifact: str | Path | Artifact, out: str | Path, *,
                    format: Literal["merged", "adapter", "gguf"] = "merged", force: bool = False, dtype: str = "auto",
                    quants: list[str] | tuple[str, ...] = ("q8_0",)) -> Path:
    """Write `artifact` to `out` as a merged model folder, a standalone adapter or GGUF files; return `out`.

    `dtype` of the merged weights: "auto" keeps the base checkpoint's dtype; "bf16"/"fp32" convert. The merge itself
    is done in fp32. `quants`: the GGUF quantisations (format "gguf" only; see `honellm.export_gguf.QUANTS`).
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    out = Path(out)
    if format not in FORMATS:
        raise HoneError(f"unknown export format {format!r}", where="--format", fix=f"use one of: {', '.join(FORMATS)}")
    if format == "gguf":
        return export_gguf(art, out, quants=quants, force=force)
    if out.exists() and not force:
        raise HoneError("the export folder already exists", where=str(out), fix="choose another folder, or pass --force")
    writer = _write_adapter if format == "adapter" else _write_merged
    notes: list[str] = []
    with atomic_dir(out, overwrite=True) as tmp:
        writer(art, tmp, dtype, notes)
        provenance = {"artifact": str(art.path), "name": art.name, "method": art.manifest.method, "kind": art.kind,
                      "format": format, "base_model": art.manifest.base_model.model_dump(),
                      "prompt_program": art.program.model_dump(mode="json"), "notes": notes}
        (tmp / "hone-export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(art, format, notes))
    return out


def _write_merged(art: Artifact, folder: Path, dtype: str, notes: list[str]) -> None:
    import torch

    from honellm.hardware import pick_dtype
    from honellm.models import load

    if art.kind == "adapter":
        _require_mergeable(art)
        model, tokenizer = art.load_model(dtype="fp32", device="cpu")
        model = model.merge_and_unload()
    elif art.kind == "full":
        model, tokenizer = load(art.weights_dir, dtype="fp32", device="cpu")
    elif art.kind == "prompt":
        model, tokenizer = load(art.base_model, dtype="fp32", device="cpu")
        notes.append("a prompt-only artifact: the weights are the base model's; the prompt is in README.md")
    else:
        raise HoneError(f"a {art.kind} artifact cannot be exported as a language model", where=str(art.path),
                        fix="export an adapter or fully fine-tuned artifact")
    target = _stored_dtype(art) if dtype == "auto" else pick_dtype(dtype, "cpu")
    model = model.to(target)
    model.config.name_or_path = art.name
    for attr in ("hone_model_id",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if target != torch.float32:
        notes.append(f"weights stored in {str(target).replace('torch.', '')}")


def _write_adapter(art: Artifact, folder: Path, dtype: str, notes: list[str]) -> None:
    if art.kind != "adapter" or art.adapter_dir is None:
        raise HoneError(f"this is a {art.kind} artifact: it has no adapter to export", where=str(art.path),
                        fix="use --format merged")
    from honellm.models import load_tokenizer, resolve

    shutil.copytree(art.adapter_dir, folder, dirs_exist_ok=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    resolved = resolve(art.base_model)
    # A hub id is what other machines (and vLLM's --model) know the base by; a local path only works here.
    config["base_model_name_or_path"] = resolved.hub_id or str(resolved.path)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    load_tokenizer(art.base_model).save_pretrained(folder)
    if config.get("peft_type") not in VLLM_LORA_TYPES or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        notes.append(f"vLLM's --enable-lora loads plain LoRA adapters only; this one is {kind} "
                     "(PEFT and transformers load it; for vLLM export --format merged)")


def _require_mergeable(art: Artifact) -> None:
    # The one registry of methods; imported here, not at the top: it imports every recipe (start-up time of the
    # other export paths).
    from honellm.methods.catalog import all_methods

    method = all_methods().get(art.manifest.method)
    adapter = method.details if method is not None and method.family == "tuning" else None  # its PEFT spec
    if adapter is not None and not adapter.merges:
        raise HoneError(f"a {art.manifest.method} adapter cannot be merged into the weights (it adds virtual tokens, "
                        "not weight updates)", where=str(art.path),
                        fix="export it with --format adapter and load it with PEFT")


def _stored_dtype(art: Artifact):
    import torch

    from honellm.hardware import DTYPES
    from honellm.models import resolve

    source = art.weights_dir if art.kind == "full" else resolve(art.base_model).path
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)


_FORMAT_NAMES = {"merged": "a merged model", "adapter": "a PEFT adapter", "gguf": "GGUF (merged, then quantised)"}


def _readme(art: Artifact, format: str, notes: list[str]) -> str:
    program = art.program
    lines = [f"# {art.name}", "",
             f"Exported by Hone from artifact `{art.path}` ({art.manifest.method}, base "
             f"`{art.manifest.base_model.id}`), as {_FORMAT_NAMES[format]}.",
             "", "## The prompt it was tuned with", "",
             "Send requests the way the model was trained: through the tokenizer's chat template, with"]
    lines.append(f"- system message: {program.system!r}" if program.system else "- no system message (the template's default)")
    lines.append(f"- user turn template: {program.template!r}" if program.template else "- the user turn as it is")
    if program.demonstrations:
        lines.append(f"- {len(program.demonstrations)} demonstrations before the query (see hone-export.json)")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def export_gguf(artifact: str | Path | Artifact, out: str | Path, *, quants: list[str] | tuple[str, ...] = ("q8_0",),
                force: bool = False) -> Path:
    """Write `out/<name>-<quant>.gguf` for each quantisation, a `Modelfile` (Ollama) and a README; return `out`.

    Several quantisations share one merge; the `Modelfile` names the first, `Modelfile.<quant>` each other.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    quants = check_quants(list(quants))
    out = Path(out)
    if out.exists() and not force:
        raise HoneError("the export folder already exists", where=str(out), fix="choose another folder, or pass --force")
    config = _source_config(art)
    supported_architecture(config, where=str(art.path))
    notes: list[str] = []
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < config.get("max_position_embeddings", 0):
        notes.append(f"the model attends over a sliding window of {window} tokens; llama.cpp attends over the whole "
                     f"context (as its converter does for this architecture): outputs differ past {window} tokens")
    files: dict[str, dict] = {}
    stem = _file_stem(art.name)
    with atomic_dir(out, overwrite=True) as tmp:
        merged = tmp / ".merged"
        _write_merged(art, merged, "fp32", notes)
        for i, quant in enumerate(quants):
            gguf_file = tmp / f"{stem}-{quant}.gguf"
            fallbacks = write_gguf(merged, gguf_file, quant, name=art.name)
            if fallbacks:
                kinds = sorted({f.rsplit(" ", 1)[1].strip("()") for f in fallbacks})
                notes.append(f"{quant}: {len(fallbacks)} tensors whose rows are not a multiple of the block size "
                             f"were stored {'/'.join(kinds)} instead (as llama.cpp does): {', '.join(fallbacks[:4])}"
                             + (" ..." if len(fallbacks) > 4 else ""))
            modelfile = "Modelfile" if i == 0 else f"Modelfile.{quant}"
            (tmp / modelfile).write_text(modelfile_text(art, gguf_file.name, _chat_template(merged), notes))
            files[quant] = {"file": gguf_file.name, "bytes": gguf_file.stat().st_size, "modelfile": modelfile}
        import shutil

        shutil.rmtree(merged)
        provenance = {"artifact": str(art.path), "name": art.name, "method": art.manifest.method, "kind": art.kind,
                      "format": "gguf", "files": files, "base_model": art.manifest.base_model.model_dump(),
                      "prompt_program": art.program.model_dump(mode="json"), "notes": notes}
        (tmp / "hone-export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        readme = _readme(art, "gguf", notes)
        first = files[quants[0]]["file"]
        readme += ("\n## Run it\n\n"
                   f"- llama.cpp: `llama-cli -m {first} -cnv` (the chat template is in the file)\n"
                   f"- Ollama: `ollama create {stem} -f Modelfile && ollama run {stem}` (the Modelfile carries the "
                   "system prompt, demonstrations and sampling parameters)\n")
        (tmp / "README.md").write_text(readme)
    return out
