"""Checkpoints that survive `kill -9` and resume to the very same weights.

A checkpoint is a folder `step-000120/` holding everything the next step depends on:

- `trainable.safetensors`: the trainable parameters only (an adapter is a few MB; the frozen base is reloaded);
- `optimizer.pt`, `schedule.pt`: AdamW moments and the schedule's position;
- `rng-<rank>.pt`: each process's Python, NumPy, torch (and CUDA) random states, for dropout;

Nothing is unpickled: the `.pt` files hold only tensors, numbers, strings and containers of them, and are read
with `torch.load(weights_only=True)` (`load_plain`), so a run folder from elsewhere cannot run code when it is
resumed; a file that needs more is refused with a HoneError.
- `state.json`: the step and what the recipe keeps (best score, early-stopping count, monitor totals).

The data order is a function of (seed, step) (`LengthGroupedBatches`), so it needs no state. The folder is written
beside its final name and renamed into place, so a kill leaves either the whole checkpoint or none; the oldest
are removed only after a new one is complete. A resumed run rebuilds the model (its random adapter init is then
overwritten), restores all of the above, and continues from the next step: its final weights equal those of
an uninterrupted run bit for bit (tested with SIGKILL).

Under FSDP (accelerate launch with an FSDP2 config, GPUs only) parameters and optimizer state are sharded: model
and optimizer then go through accelerate's `save_state`/`load_state` (sharded, in `state/`), and whole weights
for the artifact are gathered with `gather_trainable`. These FSDP paths are not exercised by the CPU test suite.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from honellm.atomic import atomic_write_json
from honellm.errors import HoneError
from honellm.training.optim import trainable_parameters

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """The random states as plain data (tensors, numbers, tuples): what `load_plain` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_fsdp(accelerator) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def gather_trainable(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Whole trainable tensors on the main process (None on the others). Under FSDP every process must call it."""
    main = accelerator is None or accelerator.is_main_process
    if not is_fsdp(accelerator):
        return trainable_state(accelerator.unwrap_model(model) if accelerator is not None else model) if main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [name for name, _ in trainable_parameters(accelerator.unwrap_model(model))]
    return {name: full[name].contiguous() for name in names} if main else None


def load_gathered(accelerator, model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None, *, where: str) -> None:
    """Put whole trainable tensors (read on the main process under FSDP; on every process otherwise) into `model`."""
    if not is_fsdp(accelerator):
        load_trainable_state(accelerator.unwrap_model(model) if accelerator is not None else model, tensors, where=where)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                         strict=False))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (contiguous CPU copies, ready for safetensors)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(model)}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """Copy saved trainable parameters into `model`; the names must match exactly (same method, same config)."""
    params = dict(trainable_parameters(model))
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise HoneError(
            f"the checkpoint does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})", where=where,
            fix="resume with the same method and settings the run started with, or start again with --force")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


class Checkpointer:
    """Writes, lists, prunes and restores the checkpoints of one run (`folder/step-NNNNNN`)."""

    def __init__(self, folder: str | Path, *, keep: int = 2, accelerator=None):
        self.folder = Path(folder)
        self.keep = keep
        self.accelerator = accelerator

    # ------------------------------------------------------------------------------------------ listing

    def steps(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / "state.json").exists():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1][1] if steps else None

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, *, model, optimizer, schedule, state: dict) -> Path:
        """Write checkpoint `step` atomically (all processes call this; each writes its RNG state)."""
        acc = self.accelerator
        rank = acc.process_index if acc is not None else 0
        main = acc is None or acc.is_main_process
        final = self.folder / f"step-{step:06d}"
        tmp = self.folder / f".step-{step:06d}.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        if is_fsdp(acc):
            acc.save_state(str(tmp / "state"))  # sharded model and optimizer, written by every process
        if main:
            if not is_fsdp(acc):
                unwrapped = acc.unwrap_model(model) if acc is not None else model
                save_file(trainable_state(unwrapped), tmp / "trainable.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(schedule.state_dict(), tmp / "schedule.pt")
            atomic_write_json(tmp / "state.json", {"step": step, **state})
        self._barrier()
        if main:
            for file in tmp.rglob("*"):  # the data on disk before the rename makes it visible
                if file.is_file():
                    _fsync(file)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.folder)
            self.prune()
        self._barrier()
        return final

    def prune(self) -> None:
        """Remove all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
        for _, path in self.steps()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.folder.glob(".step-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ restoring

    def restore(self, path: str | Path, *, model, optimizer, schedule) -> dict:
        """Load checkpoint `path` into model, optimizer, schedule and the RNGs; return its `state.json`."""
        path = Path(path)
        acc = self.accelerator
        rank = acc.process_index if acc is not None else 0
        if is_fsdp(acc):
            acc.load_state(str(path / "state"))
        else:
            unwrapped = acc.unwrap_model(model) if acc is not None else model
            load_trainable_state(unwrapped, load_file(path / "trainable.safetensors"), where=str(path))
            optimizer.load_state_dict(load_plain(path / "optimizer.pt"))
        schedule.load_state_dict(load_plain(path / "schedule.pt"))
        rng_file = path / f"rng-{rank}.pt"
        if not rng_file.exists():
            raise HoneError(f"the checkpoint has no random state for process {rank}", where=str(path),
                            fix="resume with as many processes as the run was started with")
        set_rng_state(load_plain(rng_file))
        return json.loads((path / "state.json").read_text())

    def _barrier(self) -> None:
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()


def load_plain(path: str | Path):
    """A `.pt` file of tensors, numbers, strings and containers, read without unpickling anything else
    (`torch.load(weights_only=True)`): a file that asks to build other Python objects, as a crafted one would to
    run code, is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise HoneError(f"{Path(path).name} holds Python objects beyond tensors and numbers; Hone does not load them "
                        "(loading them could run code)", where=str(path),
                        fix="resume only run folders this version of Hone wrote; otherwise start the run again "
                            f"({str(err).splitlines()[0][:120]})") from None


def save_trainable(path: str | Path, tensors: dict[str, torch.Tensor] | torch.nn.Module) -> None:
    """Write trainable tensors (from `gather_trainable`, or a module's trainable parameters) to one safetensors
    file atomically (the best-so-far weights)."""
    if isinstance(tensors, torch.nn.Module):
        tensors = trainable_state(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
