#!/usr/bin/env bash
# On a GPU device machine, from the repository root, with `.gpu/` (bench/gpu_kit.py) carried along:
#   bash bench/gpu_run.sh [bench_gpu.py options]        # e.g. --phases sft-lora-135m,dpo-135m --budget 300
#   bash bench/gpu_run.sh --host-time [options]         # first also: each side's launch-bound step, timed (~1 min)
# Installs the kit's wheels into /tmp/site (the image's packages are left as they are), prints the environment,
# runs the GPU tests (tests/unit/test_gpu.py; its compiling ones only with --compile or --cuda-graphs) and then
# the benchmark (bench/bench_gpu.py, 420 s budget unless given). Logs go to $OUT (the device tool's folder) when it
# is set, else /tmp/hone-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
host_time=0
args=()
for arg in "$@"; do [[ "$arg" == --host-time ]] && host_time=1 || args+=("$arg"); done
set -- "${args[@]}"
out="${OUT:-/tmp/hone-gpu}"
kit="${HONE_GPU_KIT:-.gpu}"   # another kit folder (a dry run on a CPU: gpu_kit.py --python-version 3.11 --out DIR)
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$kit"/wheels/*.whl || { echo "gpu_run: the kit's wheels did not install (python bench/gpu_kit.py makes them)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false HONE_BENCH_TOKENIZER="$(cd "$kit" && pwd)/tokenizer"
python3 bench/gpu_kit.py --check 2>&1 | tee "$out/env.txt" || exit 1
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/unit/test_gpu.py -rs 2>&1 | tail -25 \
    | tee "$out/gpu_tests.txt"
if [[ " $* " == *" --compile "* || " $* " == *" --cuda-graphs "* ]]; then  # the levers' losses against eager's first
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m "gpu and slow" tests/unit/test_gpu.py -rs 2>&1 | tail -25 \
        | tee "$out/gpu_lever_tests.txt"
fi
if (( host_time )); then  # the 135M shape's 30 layers at tiny widths: a step's time is the host's (bench_launches.py)
    timeout 120 python3 bench/bench_launches.py --time --device cuda --precision bf16 2>&1 | tail -4 \
        | tee "$out/host_time.txt"
    # a LoRA policy's decoding step (GRPO's rollouts without vLLM): Hone's engine (CUDA graphs) and model.generate
    timeout 120 python3 bench/bench_launches.py --recipe rollout --time --device cuda --precision bf16 --steps 4 \
        --batch-size 32 --shape 135m 2>&1 | tail -4 | tee -a "$out/host_time.txt"
fi
budget=()
[[ " $* " == *" --budget "* ]] || budget=(--budget 420)
python3 bench/bench_gpu.py "${budget[@]}" "$@" 2>&1 | tee "$out/bench_gpu.log"
