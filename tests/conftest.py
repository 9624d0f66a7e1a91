"""Shared fixtures: a tiny random chat model (fast unit tests) and the embedded model (integration tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HONE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run fastest so, and a loaded machine punishes two
    (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory):
    """arch_dir(arch) -> the folder of a tiny random model of `arch` (honellm.testing.ARCHITECTURES), ChatML
    template, built once per session."""
    from honellm.testing import make_tiny_arch_model

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_arch_model(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 384-token byte-level BPE vocabulary and a ChatML chat template."""
    from honellm.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) of the tiny model in fp32, eval mode. Do not train it in place: load your own copy."""
    from honellm.models import load

    return load(tiny_model_dir, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded default model converted to a safetensors folder (converted once, then cached)."""
    from honellm.defaults import DEFAULT_MODEL
    from honellm.errors import MissingDependency
    from honellm.models import convert_embedded

    try:
        return convert_embedded(DEFAULT_MODEL)
    except MissingDependency as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the project; tests that need it skip with a reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they live beside the project, never in it)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Integration and end-to-end tests are slow by definition; mark them so `-m "not slow"` skips them."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts or "e2e" in parts:
            item.add_marker(pytest.mark.slow)
