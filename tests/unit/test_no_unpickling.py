"""Nothing in a run folder is unpickled: a checkpoint or reference cache that would run code when loaded is refused,
and the code does not run; Hone's own checkpoints round-trip through the safe loader."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from honellm.errors import HoneError
from honellm.reward.recipes.common import cached_reference
from honellm.training.checkpoint import Checkpointer, load_plain


class Payload:
    """What an attacker would put in a run folder: unpickling it calls `Path.touch` on a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write_malicious(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, schedule


def test_a_checkpoint_round_trips_through_the_safe_loader(tmp_path):
    model, optimizer, schedule = _model_and_optimizer()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    folder = checkpoints.save(1, model=model, optimizer=optimizer, schedule=schedule, state={"best": 0.5})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model2, optimizer2, schedule2 = _model_and_optimizer()
    state = checkpoints.restore(folder, model=model2, optimizer=optimizer2, schedule=schedule2)
    assert state == {"step": 1, "best": 0.5}
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected  # every RNG restored
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("file", ["optimizer.pt", "schedule.pt", "rng-0.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, file):
    model, optimizer, schedule = _model_and_optimizer()
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    folder = checkpoints.save(1, model=model, optimizer=optimizer, schedule=schedule, state={})
    marker = tmp_path / "pwned"
    _write_malicious(folder / file, marker)
    with pytest.raises(HoneError) as info:
        checkpoints.restore(folder, model=model, optimizer=optimizer, schedule=schedule)
    assert file in info.value.what and "could run code" in info.value.what
    assert not marker.exists(), "the pickle's code ran"


def test_a_malicious_reference_cache_is_refused(tmp_path):
    class OneProcess:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

    marker = tmp_path / "pwned"
    cache = tmp_path / "reference_logps.pt"
    _write_malicious(cache, marker)
    with pytest.raises(HoneError, match="could run code"):
        cached_reference(cache, "key", lambda: {"train": torch.zeros(2)}, OneProcess())
    assert not marker.exists()
    cache.unlink()
    values = cached_reference(cache, "key", lambda: {"train": torch.ones(2)}, OneProcess())
    assert torch.equal(cached_reference(cache, "key", lambda: pytest.fail("recomputed"), OneProcess())["train"],
                       values["train"])


def test_the_safe_loader_reads_plain_data_and_refuses_objects(tmp_path):
    torch.save({"a": torch.arange(3), "b": [1, 2.5, "x", None, (1, 2)]}, tmp_path / "plain.pt")
    assert load_plain(tmp_path / "plain.pt")["b"] == [1, 2.5, "x", None, (1, 2)]
    with open(tmp_path / "raw.pt", "wb") as handle:
        pickle.dump(Payload(tmp_path / "pwned"), handle)
    with pytest.raises(HoneError):
        load_plain(tmp_path / "raw.pt")
    assert not (tmp_path / "pwned").exists()
