"""Operations per step: what a small model's GPU step launches, counted (and timed) on a CPU.

    python bench/bench_launches.py                 # SmolLM2-135M shape, LoRA SFT, 8 examples a step, 3 steps a side
    python bench/bench_launches.py --steps 2 --batch-size 4
    python bench/bench_launches.py --time          # host milliseconds per step at the 135M shape made narrow
    python bench/bench_launches.py --recipe dpo --batch-size 4   # the DPO recipe against TRL's DPOTrainer
    python bench/bench_launches.py --recipe rollout --batch-size 32 --shape 135m-narrow   # GRPO-style decoding

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
launches as one.

`--time` measures what the count stands for: the host's own time per step. It runs both sides without counting,
on the `135m-narrow` shape (SmolLM2-135M's 30 layers, 9 query and 3 key/value heads and everything a step
dispatches, with a hidden width of 36, an MLP width of 48 and a 384-token vocabulary, so that the arithmetic is
a few microseconds an operation) and short records, and prints the milliseconds of each optimizer step (forward to optimizer) and from
one step's end to the next (the loop's batching and logging too: what tokens/s sees). On a CPU this is the
Python, dispatcher and autograd time a GPU step's host spends, less the driver's cost per launch; with
`--device cuda` on a GPU it is the launch-bound step itself. Use fp32 on a CPU: a CPU's bf16 kernels carry a
per-call cost of their own (oneDNN) that a GPU's do not, which the narrow shape would count as host time.
`--recipe dpo` does the same for the DPO recipe against `DPOTrainer` (reference log-probs computed before training
on both sides), `--recipe rollout` for a LoRA policy's decoding steps (`rollout_sides`). This benchmark prints
figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


class Timer:
    """Wall milliseconds of each optimizer step (`begin` to `end`) and from one step's end to the next, the device
    synchronised at both ends (a no-op on a CPU)."""

    def __init__(self, device: str):
        self.device, self.steps, self.ends = device, [], []

    def _sync(self) -> float:
        import time

        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.started = self._sync()

    def end(self) -> None:
        now = self._sync()
        self.steps.append(1000 * (now - self.started))
        self.ends.append(now)

    @property
    def gaps(self) -> list[float]:
        return [1000 * (b - a) for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)]


def hone_side(model: str, rows: list[dict], args) -> Counter | Timer:
    from honellm.training import batching
    from honellm.training import step as step_module

    counter = Timer(args.device) if args.time else Counter()
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
        if args.time:
            return original_to(self, device)
        counter.paused = True
        try:
            return original_to(self, device)
        finally:
            counter.paused = False

    batching.Batch.to = moved
    # the path a GPU step takes (Liger off on CUDA: TRL runs without it here too)
    os.environ.update(HONE_FAST_FORWARD="0", HONE_NATIVE="0", HONE_LIGER="0")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (_hone_dpo if args.recipe == "dpo" else _hone_sft)(model, data, Path(tmp) / "run", args)
    finally:
        step_module.TrainStep.__call__, batching.Batch.to = original, original_to
    return counter


def _hone_sft(model: str, data: Path, out: Path, args) -> None:
    from bench_gpu import SYSTEM

    from honellm.task import Task
    from honellm.tuning import get_method
    from honellm.tuning.sft import tune

    task = Task.from_config({"name": "launches", "model": model, "data": {"train": str(data)},
                             "prompt": {**({} if args.time else {"system": SYSTEM}), "template": "Review: {text}"},
                             "target": "label", "choices": ["positive", "negative"]})
    config = get_method("lora").config(r=8, alpha=16, target_modules="all-linear", max_steps=args.steps,
                                       batch_size=args.batch_size, max_length=args.max_length, lr=2e-4, eval_every=0,
                                       save_every=0, seed=0, precision=args.precision, attention="sdpa", packing=False)
    tune(task, "lora", config, out=out)


def _hone_dpo(model: str, data: Path, out: Path, args) -> None:
    """The DPO recipe, its reference log-probs computed before training (not counted), as TRL's side does."""
    from honellm.reward.recipes.preference import DPOConfig, train_preference
    from honellm.task import Task

    task = Task.from_config({"name": "launches-dpo", "model": model, "data": {"train": str(data)}})
    config = DPOConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, r=8, alpha=16,
                       target_modules="all-linear", lr=5e-5, beta=0.1, schedule="constant", warmup_steps=0,
                       eval_every=0, save_every=0, seed=0, precision=args.precision, attention="sdpa", packing=False)
    train_preference(task, config, method="dpo", out=out)


def trl_side(model: str, rows: list[dict], args) -> Counter | Timer:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    counter = Timer(args.device) if args.time else Counter()

    class Count(TrainerCallback):  # the whole optimizer step: forward, backward, clipping, optimizer, scheduler
        def on_step_begin(self, *a, **k):
            counter.begin()

        def on_step_end(self, *a, **k):
            counter.end()

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    common = dict(per_device_train_batch_size=args.batch_size, max_steps=args.steps, use_cpu=args.device == "cpu",
                  max_length=args.max_length, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False,
                  bf16=args.precision == "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        network = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model)
        trainer = (_trl_dpo if args.recipe == "dpo" else _trl_sft)(network, tokenizer, rows, lora,
                                                                     dict(output_dir=tmp, **common), args)
        trainer.add_callback(Count())
        trainer.train()
    return counter


def _trl_sft(model, tokenizer, rows: list[dict], lora, common: dict, args):
    from bench_gpu import messages
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": messages(r)[1:] if args.time else messages(r),
                                  "completion": [{"role": "assistant", "content": r["label"]}]} for r in rows])
    config = SFTConfig(learning_rate=2e-4, completion_only_loss=True, **common)
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


def _trl_dpo(model, tokenizer, rows: list[dict], lora, common: dict, args):
    """`DPOTrainer` with the reference log-probs precomputed before training (`precompute_ref_log_probs`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(learning_rate=5e-5, beta=0.1, lr_scheduler_type="constant", warmup_steps=0,
                       precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size * 2, **common)
    return DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


def rollout_sides(model: str, args) -> dict[str, list[float]]:
    """Operations (or, with --time, milliseconds) per decoding step of a GRPO-style rollout: a LoRA policy (r=8 on
    every linear layer, B drawn non-zero, as after some training) samples 64 tokens for `--batch-size` prompts, through
    Hone's generation engine (the policy's LoRA layers fused as the RL recipes install them; the engine merges them
    into its derived weights) and through `model.generate` on the PEFT model (TRL's GRPOTrainer without vLLM). Each
    side counts the whole call, prefill included, over the steps it decoded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from honellm.core import fused
    from honellm.generation import Generator, SamplingParams
    from honellm.models import load

    os.environ.update(HONE_NATIVE="0")  # torch's products, as on a GPU
    policy, tokenizer = load(model, dtype=args.precision, device=args.device)
    torch.manual_seed(0)
    policy = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    fused.install(policy)
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i} + {3 * i}?"}], tokenize=False,
                                             add_generation_prompt=True) for i in range(args.batch_size)]
    new_tokens = 64
    engine = Generator(policy, tokenizer, batch_size=args.batch_size)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)

    def hone() -> int:
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0))
        return max(o.completion_tokens for o in outs)

    def transformers() -> int:
        with torch.inference_mode():
            out = policy.generate(**encoded, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - encoded.input_ids.shape[1]

    class Count(TorchDispatchMode):
        n = 0  # operations dispatched under this mode (an instance's own once counted)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    found = {}
    for side, call in (("hone", hone), ("trl", transformers)):
        if side == "trl":
            fused.uninstall(policy)  # PEFT's own LoRA layers, as TRL's policy has them
        call()  # warm-up (and the engine's derived weights, rebuilt at every call of a training policy anyway)
        values = []
        for _ in range(args.steps):
            if args.time:
                timer = Timer(args.device)
                timer.begin()
                steps = call()
                timer.end()
                values.append(timer.steps[0] / steps)
            else:
                counter = Count()
                with counter:
                    steps = call()
                values.append(counter.n / steps)
        found[side] = values
    return found


def _words(rng) -> str:
    from bench_gpu import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a side (default 3; --time: 12)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples a step (default 8)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--shape", default=None,
                        help="bench_gpu.py's model shape (135m, 1.7b, tiny, 135m-narrow; default 135m, --time: "
                             "135m-narrow)")
    parser.add_argument("--time", action="store_true",
                        help="time each side's steps (host milliseconds per step) instead of counting operations")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) or bf16 (Hone's mixed precision; TRL's bf16 weights and autocast)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--time only: where the sides run")
    parser.add_argument("--recipe", choices=("sft", "dpo", "rollout"), default="sft",
                        help="sft (LoRA SFT against SFTTrainer, default), dpo (LoRA DPO against DPOTrainer, both with "
                             "the reference log-probs computed before training; --batch-size counts pairs) or rollout "
                             "(a LoRA policy sampling 64 tokens for --batch-size prompts: Hone's engine against "
                             "model.generate; per decoding step)")
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.time else 3)
    args.shape = args.shape or ("135m-narrow" if args.time else "135m")
    if args.device == "cuda" and not args.time and args.recipe != "rollout":
        raise SystemExit("--device cuda times steps: add --time (operations are counted on a CPU)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from bench_gpu import dpo_pairs, sft_data, sft_records, write_model

    torch.set_num_threads(1 if args.time else max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_model(args.shape, Path(tmp) / args.shape))
        if args.recipe == "rollout":
            found = rollout_sides(model, args)
            what = "milliseconds" if args.time else "ATen operations"
            print(f"{what} per decoding step (rollout, {args.shape} shape, LoRA r=8, {args.batch_size} prompts, 64 "
                  f"tokens, {args.precision}, {args.device}; {args.steps} calls a side):")
            for side, values in found.items():
                name = "hone (engine)" if side == "hone" else "model.generate (PEFT)"
                print(f"  {name}: {', '.join(f'{v:,.1f}' for v in values)}")
            ratio = statistics.median(found["hone"]) / statistics.median(found["trl"])
            print(f"  Hone / model.generate: {ratio:.2f}x")
            return
        # --time: 1-4 words a review (SFT, no system prompt either) or each of prompt, chosen and rejected (DPO),
        # so that the narrow shape's attention computes for microseconds too
        if args.recipe == "dpo" and args.time:
            rng = random.Random(0)
            rows = [{"prompt": [{"role": "user", "content": _words(rng)}], "chosen": _words(rng),
                     "rejected": _words(rng)} for _ in range(args.steps * args.batch_size)]
        elif args.recipe == "dpo":  # synthetic pairs (bench_gpu.py's), a quarter as long for the small tokenizer
            path = dpo_pairs(args.steps * args.batch_size, Path(tmp), small=args.shape == "tiny")
            rows = [json.loads(line) for line in path.read_text().splitlines()]
        else:
            rows = (sft_records(args.steps * args.batch_size, words=(1, 4)) if args.time
                    else sft_data(model, args.steps * args.batch_size, args.max_length))
        found = {"hone": hone_side(model, rows, args), "trl": trl_side(model, rows, args)}
    unit = "pairs" if args.recipe == "dpo" else "examples"
    setting = (f"{args.recipe.upper()}, {args.shape} shape, LoRA r=8, {args.batch_size} {unit} a step, "
               f"{args.precision}, sdpa, padded, no Liger")
    if args.time:
        print(f"Host milliseconds per optimizer step on {args.device} ({setting}, one thread; medians after the "
              f"first two steps):")
        medians = {}
        for side, timer in found.items():
            medians[side] = statistics.median(timer.gaps[1:])
            print(f"  {side}: step {statistics.median(timer.steps[2:]):.1f} ms, step to step {medians[side]:.1f} ms "
                  f"(steps: {', '.join(f'{t:.0f}' for t in timer.steps)})")
        print(f"  Hone / TRL: {medians['hone'] / medians['trl']:.2f}x the time from step to step")
        return
    print(f"ATen operations per optimizer step ({setting}):")
    for side, counter in found.items():
        print(f"  {side}: {counter.steps} (median {statistics.median(counter.steps):,.0f}); waits for the device: "
              f"{counter.syncs}")
    ratio = statistics.median(found["hone"].steps) / statistics.median(found["trl"].steps)
    print(f"  Hone / TRL: {ratio:.2f}x the operations (a launch-bound GPU step's time goes about with this)")


if __name__ == "__main__":
    main()
