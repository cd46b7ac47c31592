#!/usr/bin/env bash
# Everything the GPU machine is asked to check, in one call, each step bounded so that a slow one leaves
# time for the rest; logs go to $OUT (or ./gpu-logs). Run from the repository root on the device:
#     bash benchmarks/gpu_session.sh [tests|bench|train|train_bench|sanitize|all]   (carry the git-ignored
#                                         wheels/ folder: fla-core, einops, pyyaml, pytest-xdist, execnet)
# "tests" runs the gpu-marked suite on 8 workers (Triton compiles on the CPU); "bench" times the forward
# kernels against fla and profiles them; "train" runs only the training tests (backward, packed, compile);
# "train_bench" times forward+backward against fla (its guard bypassed where it refuses: time only) and
# profiles the gated delta rule's training step at B=2 T=8192; "sanitize" runs one largest-head backward
# under compute-sanitizer. One device call has 10 minutes: run them as separate calls.
set -uo pipefail
OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore
WHAT="${1:-all}"
python3 -m pip install -q --no-index --find-links wheels pyyaml fla-core einops pytest-xdist > "$OUT/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: run, keep its output, note how it ended
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: exit $?" >> "$OUT/steps.txt"
}
if [[ $WHAT == train ]]; then  # SIGINT on time-out, so that pytest still prints which tests failed
    step train_tests 540 timeout -s INT 530 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 -rfE \
        --tb=short -k "backward or compiles_fullgraph"
    tail -n 40 "$OUT"/train_tests.txt
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == train_bench ]]; then  # the four layers first; the rest where time is left
    step bench_train 330 python3 benchmarks/train_gpu.py --bypass-fla-guard --only gla simple_gla delta_rule gated_delta_rule
    step profile_train 150 python3 benchmarks/kernel_profile_gpu.py gated_delta_rule --backward --B 2 --T 8192
    cat "$OUT/bench_train.txt" "$OUT/profile_train.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == sanitize ]]; then  # memcheck one backward at the largest head, where a launch faulted before
    step sanitize 540 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -m gpu tests/gpu -q \
        -p no:cacheprovider -x -k "backward_largest_head and delta_product and bf16"
    tail -n 60 "$OUT/sanitize.txt"
    exit 0
fi
if [[ $WHAT != bench ]]; then
    step gpu_tests 500 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 --durations=10 -rf
    tail -n 25 "$OUT"/gpu_tests.txt
fi
if [[ $WHAT != tests ]]; then
    step bench_chunk 330 python3 benchmarks/chunk_gpu.py
    step profile 150 python3 benchmarks/kernel_profile_gpu.py gla simple_gla gated_delta_rule delta_rule
    cat "$OUT/bench_chunk.txt"
fi
cat "$OUT/steps.txt"
