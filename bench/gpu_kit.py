"""What a GPU device machine needs to run Hone's GPU tests and `bench_gpu.py`, prepared here, checked there.

The device machines lent to this project (bench/README.md, "The prepared GPU benchmark") have PyTorch,
transformers, peft, accelerate and the scientific stack, but not TRL, Liger Kernel, pydantic, datasets or Optuna,
and no network. This script downloads those as wheels for the device's Python (pinned: the versions this
repository's suite runs with, where the device's own packages allow them) and saves the embedded SmolLM2
tokenizer, all into `.gpu/` (ignored by git), which the device call carries; `bench/gpu_run.sh` installs them
into /tmp/site there (nothing of the image is changed) and runs the tests and the benchmark.

    python bench/gpu_kit.py                      # here: .gpu/wheels (CPython 3.12, manylinux x86-64), .gpu/tokenizer
    python bench/gpu_kit.py --python-version 3.11 --out /tmp/kit311   # the same set for another Python (a dry run)
    python3 bench/gpu_kit.py --check             # there (gpu_run.sh does it): versions, the GPU, what is missing

vLLM and flash-attn are not in the kit: their wheels (hundreds of MB, built against one torch) exceed what a device
call carries (64 MiB), so the benchmark runs without them (transformers' sdpa with packed-sequence masks; Hone's
torch generation engine on both sides of the GRPO step) and says so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What the device image lacks, with what those need that it lacks too. The image has torch, transformers, peft,
# accelerate, huggingface-hub, tokenizers, safetensors, numpy, pandas, pyarrow, typer, rich, tqdm, pyyaml,
# matplotlib, jinja2, psutil, xxhash, fsspec, aiohttp, requests (its package list: the device tool's KINDS.md).
# datasets 5.0 rather than this repository's 5.2: 5.2 needs huggingface-hub 2.x, the image has 1.x.
KIT = (
    "trl==1.16.0", "liger-kernel==0.8.5",
    "datasets==5.0.0", "dill==0.4.1", "multiprocess==0.70.19",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "optuna==5.1.0", "alembic==1.20.1", "sqlalchemy==2.1.9", "mako==1.4.3", "colorlog==6.12.0", "greenlet==3.5.6",
    "gguf==0.19.0",
)
# Imported by the GPU tests and the benchmark (`--check` imports each and prints its version).
NEEDED = ("torch", "transformers", "peft", "accelerate", "trl", "liger_kernel", "datasets", "pydantic", "optuna",
          "gguf", "honellm")
LIMIT_MIB = 48  # of the device call's 64 MiB; the repository itself travels too
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def prepare(out: Path, python_version: str) -> None:
    """Download the kit's wheels for `python_version` into out/wheels and save the tokenizer into out/tokenizer."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):  # a kit for one Python at a time: stale wheels would install twice
        old.unlink()
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(wheels), *KIT]
    subprocess.run(command, check=True)
    got = sorted(wheels.glob("*.whl"))
    if len(got) != len(KIT):
        sys.exit(f"expected {len(KIT)} wheels, found {len(got)} in {wheels}")
    tokenizer = out / "tokenizer"
    try:
        from honellm.defaults import DEFAULT_MODEL
        from honellm.models import load_tokenizer

        load_tokenizer(DEFAULT_MODEL).save_pretrained(tokenizer)
    except Exception as error:  # noqa: BLE001 - the embedded model is not installed: bench_gpu's small tokenizer serves
        print(f"no tokenizer saved ({error}); bench_gpu.py falls back to a small byte-level one")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {len(got)} wheels for CPython {python_version}, {size:.1f} MiB in all")
    if size > LIMIT_MIB:
        sys.exit(f"{size:.1f} MiB is over the {LIMIT_MIB} MiB this kit may take of a device call")
    print("device call: run(command='bash bench/gpu_run.sh', carry=['.gpu'], timeout_s=590)")


def check() -> int:
    """Print the GPU, each needed package's version and where it comes from, and each carried wheel's unmet
    requirements; 1 when something needed cannot be imported."""
    from packaging.requirements import Requirement

    failed = 0
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); {gpu}")
    except ImportError as error:
        print(f"torch: {error}")
        return 1
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
            print(f"  {name:14} {getattr(module, '__version__', '?'):12} {Path(module.__file__).parent}")
        except Exception as error:  # noqa: BLE001 - report every missing piece, not the first
            failed = 1
            print(f"  {name:14} MISSING: {type(error).__name__}: {error}")
    for name in ("flash_attn", "vllm"):
        found = importlib.util.find_spec(name) is not None
        print(f"  {name:14} {'installed' if found else 'not installed (the benchmark runs without it)'}")
    print(f"  {'torch varlen':14} {varlen_status(torch)}")
    for spec in KIT:
        dist = spec.split("==")[0]
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                print(f"  note: {dist} wants {req}, not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                print(f"  note: {dist} wants {req}, found {have}")
    return failed


def varlen_status(torch) -> str:
    """PyTorch's varlen attention kernel here (Hone's `hone_varlen` for packed rows): its keyword arguments and,
    on a CUDA device, its self-check against per-sequence attention (informational: the check never fails on it)."""
    try:
        from honellm.core import support, varlen
    except Exception as error:  # noqa: BLE001 - the line is informational
        return f"not checked ({type(error).__name__}: {error})"
    kernel = support.varlen_kernel()
    if kernel is None:
        return f"absent (torch {torch.__version__}; 2.10+ has it): packing stays off without flash-attn"
    keywords = sorted(support.kernel_parameters(kernel) & {"scale", "window_size", "enable_gqa", "is_causal"})
    if not torch.cuda.is_available():
        return f"present ({', '.join(keywords)}); no CUDA device to self-check it on"
    found = varlen.self_check(torch.device("cuda"), torch.bfloat16)
    static = varlen.self_check(torch.device("cuda"), torch.bfloat16, static=True)  # cuda_graphs=true's layout
    return (f"present ({', '.join(keywords)}); self-check in bf16: {found or 'passed'}; static rows (cuda_graphs): "
            f"{static or 'passed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="on the device: versions, the GPU, what is missing")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu", help="where the kit goes (default .gpu/)")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (default 3.12)")
    args = parser.parse_args()
    if args.check:
        sys.exit(check())
    prepare(args.out, args.python_version)


if __name__ == "__main__":
    main()
