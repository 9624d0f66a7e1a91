"""Operations per training step: what a small model's GPU step launches, counted on a CPU.

    python bench/bench_launches.py                 # SmolLM2-135M shape, LoRA SFT, 8 examples a step, 3 steps a side
    python bench/bench_launches.py --steps 2 --batch-size 4

On a GPU a 135M model's training step is bound by the host launching kernels, not by the GPU computing them
(bench/README.md: a few percent MFU on both sides): the step's time is about its number of kernel launches
times the host's cost per launch (Python, the dispatcher, autograd, the CUDA driver). Each ATen operation the
dispatcher runs is about one kernel launch on a GPU, so counting them on a CPU (a `TorchDispatchMode` that counts
every operation of each optimizer step: forward, backward, clipping, optimizer) predicts what a GPU step launches,
without a GPU. The count does not depend on the weights or the machine.

Each step's count of operations that make the host wait for the device (a value read back, an output sized by
the data) is printed beside it: each such wait empties the queue of launched kernels.

Sides, on the same synthetic records (bench_gpu.py's), LoRA r=8 on every linear layer, fp32, sdpa attention,
padded batches, as a GPU step without Liger runs them:
- `hone`: Hone's SFT recipe with its GPU path (transformers' forward: the direct training forward and the native
  CPU kernels stand aside, as they do on a GPU; fused LoRA; the LM head at answer positions only);
- `trl`: TRL's `SFTTrainer` (PEFT's LoRA, transformers' forward with full logits, its loss and its per-step
  metrics), `gradient_checkpointing=False`, `completion_only_loss=True`.
Liger's kernels (CUDA only) would cut both sides' counts; CUDA graphs (`cuda_graphs=true`) replay a layer's
launches as one. This benchmark prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


class Counter:
    """Counts the ATen operations dispatched between `begin` and `end` (one optimizer step), and among them those
    that make a GPU's host wait for the device: a value read back (`.item()`, `bool()`, `int()` of a tensor) or an
    output whose size depends on the data (`nonzero`, boolean indexing, `masked_select`, `unique`)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if counter.paused:
                    return func(*args, **(kwargs or {}))
                counter.current += 1
                if func in syncing or (func is aten.index.Tensor and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
                    counter.current_syncs += 1
                return func(*args, **(kwargs or {}))

        self.mode, self.current, self.current_syncs, self.steps, self.syncs = Mode(), 0, 0, [], []
        self.paused = False  # host-side work a GPU step does on the CPU, not counted (`hone_side`)

    def begin(self) -> None:
        import torch

        self.current = self.current_syncs = 0
        # `.tolist()` and `.cpu()` read a device tensor back too, but dispatch nothing on a CPU: counted by hand
        self.saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu")}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._reading(method))
        self.mode.__enter__()

    def end(self) -> None:
        import torch

        self.mode.__exit__(None, None, None)
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        self.steps.append(self.current)
        self.syncs.append(self.current_syncs)

    def _reading(self, method):
        def read(tensor, *args, **kwargs):
            if not self.paused:
                self.current_syncs += 1
            return method(tensor, *args, **kwargs)

        return read


def hone_side(model: str, rows: list[dict], args) -> Counter:
    import json

    from bench_gpu import SYSTEM

    from honellm.task import Task
    from honellm.training import batching
    from honellm.training import step as step_module
    from honellm.tuning import get_method
    from honellm.tuning.sft import tune

    counter = Counter()
    original = step_module.TrainStep.__call__

    def counted(self, *a, **k):
        counter.begin()
        try:
            return original(self, *a, **k)
        finally:
            counter.end()

    step_module.TrainStep.__call__ = counted
    # A micro-batch's target positions are found on the CPU from its labels as it moves to the device
    # (`Batch.to`): host work in a GPU run, neither kernel launches nor waits for the device; not counted.
    original_to = batching.Batch.to

    def moved(self, device):
        counter.paused = True
        try:
            return original_to(self, device)
        finally:
            counter.paused = False

    batching.Batch.to = moved
    os.environ.update(HONE_FAST_FORWARD="0", HONE_NATIVE="0")  # the path a GPU step takes
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            task = Task.from_config({"name": "launches", "model": model, "data": {"train": str(data)},
                                     "prompt": {"system": SYSTEM, "template": "Review: {text}"}, "target": "label",
                                     "choices": ["positive", "negative"]})
            config = get_method("lora").config(r=8, alpha=16, target_modules="all-linear", max_steps=args.steps,
                                               batch_size=args.batch_size, max_length=args.max_length, lr=2e-4,
                                               eval_every=0, save_every=0, seed=0, precision="fp32",
                                               attention="sdpa", packing=False)
            tune(task, "lora", config, out=Path(tmp) / "run")
    finally:
        step_module.TrainStep.__call__, batching.Batch.to = original, original_to
    return counter


def trl_side(model: str, rows: list[dict], args) -> Counter:
    from bench_gpu import messages
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    counter = Counter()

    class Count(TrainerCallback):  # the whole optimizer step: forward, backward, clipping, optimizer, scheduler
        def on_step_begin(self, *a, **k):
            counter.begin()

        def on_step_end(self, *a, **k):
            counter.end()

    dataset = Dataset.from_list([{"prompt": messages(r), "completion": [{"role": "assistant", "content": r["label"]}]}
                                 for r in rows])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                           learning_rate=2e-4, use_cpu=True, max_length=args.max_length, logging_steps=1,
                           save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
                           gradient_checkpointing=False, completion_only_loss=True)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa"),
                             args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model),
                             peft_config=lora, callbacks=[Count()])
        trainer.train()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps a side (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples a step (default 8)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shape", default="135m", help="bench_gpu.py's model shape (135m, 1.7b, tiny)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from bench_gpu import sft_data, write_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model(args.shape, Path(tmp) / args.shape))
        rows = sft_data(model, args.steps * args.batch_size, args.max_length)
        found = {"hone": hone_side(model, rows, args), "trl": trl_side(model, rows, args)}
    print(f"ATen operations per optimizer step ({args.shape} shape, LoRA r=8, {args.batch_size} examples a step, "
          f"fp32, sdpa, padded, no Liger):")
    for side, counter in found.items():
        print(f"  {side}: {counter.steps} (median {statistics.median(counter.steps):,.0f}); waits for the device: "
              f"{counter.syncs}")
    ratio = statistics.median(found["hone"].steps) / statistics.median(found["trl"].steps)
    print(f"  Hone / TRL: {ratio:.2f}x the operations (a launch-bound GPU step's time goes about with this)")


if __name__ == "__main__":
    main()
