#!/usr/bin/env bash
# Everything the GPU machine is asked to check, in one call, each step bounded so that a slow one leaves
# time for the rest; logs go to $OUT (or ./gpu-logs). Run from the repository root on the device:
#     bash benchmarks/gpu_session.sh            (carry the git-ignored wheels/ folder: fla-core, einops, pyyaml)
set -uo pipefail
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --find-links wheels pyyaml fla-core einops > "$OUT/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: run, keep its output, note how it ended
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $?" >> "$OUT/steps.txt"
}
step gpu_tests_chunk 240 python3 -m pytest -m gpu tests/gpu -k chunk_triton -q -p no:cacheprovider
step bench_chunk 240 python3 benchmarks/chunk_gpu.py
step profile 90 python3 benchmarks/kernel_profile_gpu.py gla gated_delta_rule longhorn
cat "$OUT/steps.txt"
tail -n 3 "$OUT"/gpu_tests_chunk.txt
cat "$OUT/bench_chunk.txt"
