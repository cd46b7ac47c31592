#!/usr/bin/env bash
# Everything the GPU machine is asked to check, in one call, each step bounded so that a slow one leaves
# time for the rest; logs go to $OUT (or ./gpu-logs). Run from the repository root on the device (carry the
# git-ignored wheels/ folder: fla-core, einops, pyyaml, pytest-xdist, execnet):
#     bash benchmarks/gpu_session.sh [tests|bench|train|train_bench|tune_delta|tune_gla|tune_kda|kda|attention|mqar|mesa|online|online_tests|
#                                    second_order_bench|second_order_tests|context_parallel|first_rows|twins|last_rows|frontier_rows|walk_warps|long_tests|rls_chunks|rls_warps|rls_running|launch_sweep|mlp_train|affine_first|affine_short|affine_tiny|second_order_quick|cg_quick|kernel_tests|kernel_bench|kernel_all|kernel_recheck|kernel_baseline|online_verify|online_next|walk_variants|rows_x2|diagnose|all]
# "tests" runs the gpu-marked suite on 8 workers (Triton compiles on the CPU); "bench" times the forward
# kernels against fla and profiles them (KDA's and gated DeltaProduct's: "kda", fla's autotuning takes
# minutes); "train"
# runs only the training tests (backward, packed, compile); "train_bench" times forward+backward against fla
# (its guard bypassed where it refuses: time only) and profiles the delta rule's training step at B=2 T=8192;
# "tune_delta" sweeps the delta rule's backward launch settings at that shape; "tune_gla" GLA's forward ones
# at both shapes; "tune_kda" KDA's training step's; "kda" profiles KDA's kernels, runs its GPU tests and times
# it and gated DeltaProduct against fla (forward rows first); "attention" runs the attention kernels' GPU
# tests and times them against SDPA, FlexAttention and fla (with local-linear's solver study);
# "tune_attention" sweeps the local-constant kernels' launch table (softmax's training step);
# "mesa" runs MesaNet-by-conjugate-gradients' GPU tests and times it against fla (benchmarks/second_order_gpu.py);
# "online" benchmarks/online_gpu.py (the nonlinear memories' kernels; ttt_linear against fla), "online_tests" their
# GPU tests (ONLINE_TESTS: a -k expression; ONLINE_TESTS_SECONDS: their time limit);
# "second_order_bench" is one call of both benchmarks (ttt_linear only, the steps kernel's warps swept),
# "second_order_tests" one of both GPU test modules; "second_order_quick" the changed layers' rows and their tests
# without the longest sequences, in one call; "cg_quick" the conjugate-gradient layers' rows, profile and GPU tests;
# "mqar" runs examples/mqar.py's sweep (its table: python examples/mqar.py --from-csv mqar*.csv);
# "diagnose" finds which backward kernel of the delta family drifts from its float32 run in bf16 at K = 256. One device call has 10 minutes: separate calls.
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
        --tb=short -k "backward or compiles_fullgraph or on_cuda"
    tail -n 40 "$OUT"/train_tests.txt
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == train_bench ]]; then  # the four layers, the least measured first
    step bench_train 330 python3 benchmarks/train_gpu.py --bypass-fla-guard --only gla delta_rule gated_delta_rule simple_gla
    step profile_train 150 python3 benchmarks/kernel_profile_gpu.py delta_rule --backward --B 2 --T 8192
    cat "$OUT/bench_train.txt" "$OUT/profile_train.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == tune_delta ]]; then  # the delta rule's backward launch settings with few long sequences
    step tune 540 python3 benchmarks/tune_gpu.py delta_rule --backward --B 2 --T 8192 \
        --kernels dstates_long wy_backward dqkw dv_local prepare
    cat "$OUT/tune.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == tune_gla ]]; then  # GLA's forward launch settings on the GPU lent (it trailed fla's on an H200)
    step tune_gla 270 python3 benchmarks/tune_gpu.py gla --B 8 --T 2048 --kernels cumsum states scores output
    step tune_gla_long 270 python3 benchmarks/tune_gpu.py gla --B 2 --T 8192 --kernels states_long scores output
    cat "$OUT/tune_gla.txt" "$OUT/tune_gla_long.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == tune_kda ]]; then  # the per-key delta kernels' launch settings, a training step
    step tune_kda 540 python3 benchmarks/tune_gpu.py kda --backward --B 8 --T 2048 \
        --kernels scores prepare states output intra dqkw wy_backward dstates gate_backward
    cat "$OUT/tune_kda.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kda ]]; then  # the per-key delta kernels: where the time goes, their GPU tests, fla in one call
    step profile_kda 90 bash -c "python3 benchmarks/kernel_profile_gpu.py kda --no-peer &&
        python3 benchmarks/kernel_profile_gpu.py kda --no-peer --backward"
    step kda_tests 150 timeout -s INT 140 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -n 8 -rfE \
        --tb=short -k "kda"
    step bench_kda 290 python3 benchmarks/delta_family_gpu.py --chunked-only
    cat "$OUT/profile_kda.txt" "$OUT/bench_kda.txt"
    tail -n 15 "$OUT/kda_tests.txt"
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == mqar ]]; then  # examples/mqar.py's sweep, a process per layer and convolution; rows kept as they finish
    python3 -c "import ttr_codegen.models" > "$OUT/import.txt" 2>&1 ||
        python3 -m pip install -q --no-index --find-links wheels --no-deps transformers huggingface_hub >> "$OUT/import.txt" 2>&1
    # One CPU thread each (14 processes on 16 cores: torch's default of a thread per core oversubscribes them).
    # Linear attention, where one run per cell is a lottery, gets Zoology's learning-rate sweep, a process per
    # width; mesa (an exact solve per query, the slowest) runs at one width.
    export OMP_NUM_THREADS=1
    part=0
    for conv in yes no; do
        for run in "linear_attention --widths 64 --lrs 1e-3 3e-3 1e-2" "linear_attention --widths 128 --lrs 1e-3 3e-3 1e-2" \
                   gated_delta_rule longhorn softmax_attention local_linear_attention_cg "mesa --widths 64"; do
            part=$((part + 1))
            step "mqar$part" 500 python3 examples/mqar.py --specs $run --conv $conv --csv "$OUT/mqar$part.csv" \
                --plot "/tmp/mqar$part.png" &
        done
    done
    wait
    # At most 8 files come back from a device call: the rows in one file, the logs in another.
    cat "$OUT"/mqar*.csv > /tmp/mqar.csv && rm "$OUT"/mqar*.csv && mv /tmp/mqar.csv "$OUT/mqar.csv"
    grep -h "accuracy=\|Error" "$OUT"/mqar[0-9]*.txt
    tail -n +1 "$OUT"/mqar[0-9]*.txt > /tmp/mqar_logs.txt && rm "$OUT"/mqar[0-9]*.txt && mv /tmp/mqar_logs.txt "$OUT/"
    cat "$OUT/import.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == mesa ]]; then  # MesaNet by conjugate gradients: its GPU tests, then against fla's chunk_mesa_net
    step mesa_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 4 -rfE --tb=short
    step bench_mesa 200 python3 benchmarks/second_order_gpu.py
    tail -n 25 "$OUT/mesa_tests.txt"
    cat "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == online ]]; then  # the nonlinear memories' kernels against fla and our PyTorch form; where to read out apart
    step bench_online 330 python3 benchmarks/online_gpu.py
    step bench_online_batches 150 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 16x2048 32x2048 1x512
    cat "$OUT/bench_online.txt" "$OUT/bench_online_batches.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == second_order_bench ]]; then  # one call for #21's peers: ttt_linear's forms (and where to read out
    # apart: the 16x2048 and 32x2048 rows), then the conjugate-gradient layers with their steps kernel's warps swept
    step bench_online 310 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 4x2048 2x8192 16x2048 32x2048
    step bench_mesa 230 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg rls affine_mesa mesa \
        --cg-warps 4 8 --cg-precisions tf32x3 tf32 --profile mesa_cg
    cat "$OUT/bench_online.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == second_order_quick ]]; then  # both of the above in one call: what changed, timed and tested
    step bench_mesa 140 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg --cg-warps 4 8 \
        --cg-precisions tf32x3 tf32 --profile mesa_cg
    step bench_online 130 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 4x2048 2x8192
    step second_order_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py \
        tests/gpu/test_second_order_gpu.py -q -p no:cacheprovider -n 8 -rfE --tb=short -k "not 1000 and not 4096"
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt"
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/second_order_tests.txt" | tail -n 30
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kernel_tests ]]; then  # the GPU tests of the nonlinear memories, RLS and the conjugate-gradient layers
    step online_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    step rls_tests 170 timeout -s INT 160 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short
    step cg_tests 170 timeout -s INT 160 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    for name in online_tests rls_tests cg_tests; do
        echo "== $name"; grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/$name.txt" | tail -n 25
    done
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kernel_recheck ]]; then  # after kernel_all: RLS's tests and ttt_linear's state, then its rows
    # again
    step rls_tests 60 timeout -s INT 55 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    step online_tests 150 timeout -s INT 140 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -q \
        -p no:cacheprovider -n 2 -rfE --tb=short -k "on_cuda and ttt_linear"
    step bench_online 90 python3 benchmarks/online_gpu.py --layers ttt_linear
    for name in rls_tests online_tests; do
        echo "== $name"; grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/$name.txt" | tail -n 25
    done
    cat "$OUT/bench_online.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kernel_all ]]; then  # one call of both (a session's device time short): the new and changed kernels'
    # GPU tests, then the rows
    step rls_tests 110 timeout -s INT 100 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    step online_tests 90 timeout -s INT 80 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "on_cuda or (matches_oracle and ttt_linear and not 1000)"
    step cg_tests 90 timeout -s INT 80 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "mesa_cg and not affine and not 4096 and (gradients or packed or 63)"
    step bench_mesa 110 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls affine_mesa_cg --profile mesa_cg
    step bench_online 80 python3 benchmarks/online_gpu.py --layers ttt_linear --state-dots tf32 --warps 2
    step bench_mlp 80 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer --shapes 4x2048
    for name in rls_tests online_tests cg_tests; do
        echo "== $name"; grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/$name.txt" | tail -n 25
    done
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/bench_mlp.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kernel_bench ]]; then  # ttt_linear against fla (the carried state's products at TF32, two
    # pipeline stages, 2 and 8 warps for comparison), ttt_mlp and titans_mlp, then mesa_cg against fla, rls and
    # affine_mesa_cg, and mesa_cg's profile with the host's time per call
    step bench_online 150 python3 benchmarks/online_gpu.py --layers ttt_linear --state-dots tf32 --stages 2 --warps 2 8
    step bench_mlp 130 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer --state-dots tf32
    step bench_mesa 200 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls affine_mesa_cg --profile mesa_cg
    cat "$OUT/bench_online.txt" "$OUT/bench_mlp.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == online_verify ]]; then  # the nonlinear memories' kernels as they are now (the key rows' forward in
    # three bfloat16 products, the steps in TF32x3, the walk back on stored tiles): their GPU tests' bf16 and training
    # rows first (-v: each result printed as it ends, so a time limit keeps which failed), then ttt_linear against
    # fla with profiles, then the walk back's variants in a training step's backward and the walk's
    step online_tests 180 timeout -s INT 170 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -v \
        -p no:cacheprovider -n 14 -rfE --tb=line \
        -k "(bf16 and not 1000) or (bf16 and 1000 and ttt_linear) or trains or on_cuda"
    step bench_online 100 python3 benchmarks/online_gpu.py --layers ttt_linear --profile
    step walk_study 140 python3 benchmarks/online_walk_study.py --backward generated "no row gradients" \
        "products bf16x3" --variants generated "no checkpoints" "last rate loaded" "split apart" lean
    grep -E "FAILED|^E  |passed|failed" "$OUT/online_tests.txt" | tail -n 25
    cat "$OUT/bench_online.txt" "$OUT/walk_study.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == rows_x2 ]]; then  # the GPU tests online_verify did not reach (ttt_mlp's training at K = 64 decides
    # MAX_TRAINING_STATE), then the walk's state products with 16 bits of the split operand (two bfloat16 parts),
    # then the MLP memories' rows
    step online_tests 160 timeout -s INT 150 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -v \
        -p no:cacheprovider -n 14 -rfE --tb=line -k "trains_at_width_64 and ttt_mlp or trains_like_oracle and ttt_mlp"
    step walk_study 110 python3 benchmarks/online_walk_study.py --backward generated "no row loads" "no dk" \
        --variants generated "state x2" "steps x2" x2 "x2, no checkpoints"
    step bench_mlp 130 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer
    grep -E "FAILED|^E  |passed|failed" "$OUT/online_tests.txt" | tail -n 25
    cat "$OUT/walk_study.txt" "$OUT/bench_mlp.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == walk_variants ]]; then  # the walk with 16-bit state products, bf16 or TMA checkpoints, fla's numerics
    step walk_study 220 python3 benchmarks/online_walk_study.py --variants generated "no checkpoints" lean \
        "fla's precision, checkpoints bf16" "state x2" "steps x2" x2 "x2, no checkpoints" "tma checkpoints"
    cat "$OUT/walk_study.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == online_next ]]; then  # what online_verify did not reach: the larger memories' training tests (ttt_mlp's
    # at K = 64 decides MAX_TRAINING_STATE), then the walk's checkpoints against the state products' precision, then
    # every other row of the issue (the MLP memories, mesa_cg against fla, rls, affine_mesa_cg)
    step online_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -v \
        -p no:cacheprovider -n 14 -rfE --tb=line \
        -k "trains_at_width_64 or (trains and ttt_mlp) or (on_cuda and not ttt_linear)"
    step walk_study 110 python3 benchmarks/online_walk_study.py --variants generated "fla's precision" \
        "checkpoints bf16" "fla's precision, checkpoints bf16" "no checkpoints" lean
    step bench_mlp 80 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer --shapes 4x2048
    step bench_mesa 140 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls affine_mesa_cg
    grep -E "FAILED|^E  |passed|failed" "$OUT/online_tests.txt" | tail -n 25
    cat "$OUT/walk_study.txt" "$OUT/bench_mlp.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == kernel_baseline ]]; then  # every row of the second-order and nonlinear memories against fla, with
    # ttt_linear's kernels and fla's profiled (GPU time against the host's per call) and its launch variants
    step bench_online 170 python3 benchmarks/online_gpu.py --layers ttt_linear --profile --state-dots tf32 \
        --stages 1 3 --warps 2 8
    step bench_mlp 130 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer
    step bench_mesa 220 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls affine_mesa_cg --profile mesa_cg affine_mesa_cg
    cat "$OUT/bench_online.txt" "$OUT/bench_mlp.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == affine_first ]]; then  # the affine memory's sums in the kernels: the conjugate-gradient layers' GPU
    # tests, their rows against fla (affine_mesa_cg profiled), then ttt_linear's rows against fla on the GPU lent
    step cg_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    step bench_mesa 170 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg rls --profile affine_mesa_cg
    step bench_online 150 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 4x2048 2x8192 --profile
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cg_tests.txt" | tail -n 30
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == context_parallel ]]; then  # context parallelism on the one GPU without NCCL: two gloo processes per
    # layer share it (tests/gpu/test_context_parallel_gpu.py: one layer of each form, float32, the layers' GPU paths)
    step cp_tests 300 timeout -s INT 290 python3 -m pytest -m gpu tests/gpu/test_context_parallel_gpu.py -q \
        -p no:cacheprovider -n 6 -rfE --tb=short
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cp_tests.txt" | tail -n 30
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == first_rows ]]; then  # a fresh chip's first call: the single-GPU context-parallel check, then the
    # peers' rows of the second-order and nonlinear memories (ttt_linear, mesa_cg), each profiled, and where the
    # host's time goes in their calls
    step cp_tests 180 timeout -s INT 170 python3 -m pytest -m gpu tests/gpu/test_context_parallel_gpu.py -q \
        -p no:cacheprovider -n 6 -rfE --tb=short
    step bench_online 100 python3 benchmarks/online_gpu.py --layers ttt_linear --profile
    step bench_mesa 130 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls affine_mesa_cg --profile mesa_cg
    step host 60 python3 benchmarks/host_overhead_gpu.py --layers mesa_cg ttt_linear gated_delta_rule
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cp_tests.txt" | tail -n 30
    cat "$OUT/bench_online.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    grep -E "issues a call|a call \(own" "$OUT/host.txt"
    exit 0
fi
if [[ $WHAT == twins ]]; then  # the custom ops' eager twins: host time against the ops (alternating), then mesa_cg
    # against fla at both shapes (its training step was host-bound at B=4 T=2048)
    step host 100 python3 benchmarks/host_overhead_gpu.py --layers mesa_cg gated_delta_rule --no-peer --top 30
    step bench_mesa 180 python3 benchmarks/second_order_gpu.py --layers mesa_cg
    grep -E "issues a call|a call \(own" "$OUT/host.txt"
    cat "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == last_rows ]]; then  # the least device time: the second-order rows (mesa_cg against fla, the affine
    # memory and rls) and ttt_linear against fla, nothing profiled
    step bench_mesa 270 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg rls
    step bench_online 70 python3 benchmarks/online_gpu.py --layers ttt_linear
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == frontier_rows ]]; then  # the walk storing its rows' products with the weights (the read-out's frontier)
    # instead of the weights, against the generated walk; a two-layer memory's walk with its weights streamed
    # through the cache against the generated one; then every row of #21 (the second-order layers, ttt_linear
    # against fla, the MLP memories)
    step walk_study 130 python3 benchmarks/online_walk_study.py --variants generated "no checkpoints" frontier x2 \
        "x2, frontier" "x2, no checkpoints" "tma checkpoints"
    step mlp_walk 120 python3 benchmarks/mlp_walk_study.py
    step bench_mesa 100 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg rls
    step bench_online 70 python3 benchmarks/online_gpu.py --layers ttt_linear
    step bench_mlp 120 python3 benchmarks/online_gpu.py --layers ttt_mlp titans_mlp --no-peer
    cat "$OUT/walk_study.txt" "$OUT/mlp_walk.txt" "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/bench_mlp.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == walk_warps ]]; then  # the second-order rows (their first calls compile for minutes: fla's autotuning
    # and ours), then the walk with fewer warps against fla's walk (and the warps fla's autotuner picks)
    step bench_mesa 270 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg rls
    step walk_study 120 python3 benchmarks/online_walk_study.py --variants generated x2 "x2, warps 2" \
        "fla's precision" "fla's precision, warps 2" "fla's precision, warps 1" lean "lean, warps 2"
    cat "$OUT/bench_mesa.txt" "$OUT/walk_study.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == long_tests ]]; then  # the second-order kernels' GPU tests at T = 4096 (rls, mesa_cg, affine_mesa_cg:
    # fp32/fp16/bf16 against naive_<name> in float64), then ttt_linear's and mesa_cg's rows against fla, then where
    # ttt_mlp's training step spends its GPU time
    step long_tests 170 timeout -s INT 160 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py \
        tests/gpu/test_second_order_gpu.py -q -p no:cacheprovider -n 9 -rfE --tb=short -k 4096
    step bench_online 70 python3 benchmarks/online_gpu.py --layers ttt_linear
    step bench_mesa 200 python3 benchmarks/second_order_gpu.py --layers mesa_cg
    step profile_mlp 90 python3 benchmarks/online_gpu.py --layers ttt_mlp --shapes 4x2048 --no-peer --profile
    tail -n 15 "$OUT/long_tests.txt"
    cat "$OUT/bench_online.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    grep -E "ttt_mlp|kernel|Self CUDA" "$OUT/profile_mlp.txt" | head -n 40
    exit 0
fi
if [[ $WHAT == rls_chunks ]]; then  # rls by chunks, forward and backward: its GPU tests (each setting of
    # testing.RLS_KERNEL_SETTINGS with unrolled gains, every dtype, T up to 4096, training; the chunk backward's
    # first call compiles for about a minute), then its rows beside mesa_cg's (fla left out: the goal is rls
    # within 2x of mesa_cg's time) and the kernels by GPU time (the last setting: chunks both ways, gains by warps)
    step rls_tests 330 timeout -s INT 320 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q -p no:cacheprovider \
        -n 14 -rfE --tb=short -k "not running"
    step bench_rls 200 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls --no-peer \
        --rls-algorithms chunks:tokens chunks:chunks:columns chunks:chunks:warps --profile rls
    tail -n 15 "$OUT/rls_tests.txt"
    cat "$OUT/bench_rls.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == rls_running ]]; then  # rls's chunk kernels with the gains' steps in loops that run (LOOPS):
    # their GPU tests, then their rows beside the unrolled ones' (each first call's compile time in the last column)
    step rls_tests 240 timeout -s INT 230 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q -p no:cacheprovider \
        -n 14 -rfE --tb=short -k "running"
    step bench_rls 240 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls --no-peer \
        --rls-algorithms chunks:chunks:rows:16:tf32x3:running chunks:chunks:warps:16:tf32x3:running chunks:chunks:warps
    tail -n 15 "$OUT/rls_tests.txt"
    cat "$OUT/bench_rls.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == rls_warps ]]; then  # rls by chunks both ways with each warp eliminating its own copy of a chunk's
    # gains problem: its GPU tests alone, then its rows beside mesa_cg's
    step rls_tests 125 timeout -s INT 115 python3 -m pytest -m gpu tests/gpu/test_rls_gpu.py -q -p no:cacheprovider \
        -n 14 -rfE --tb=short -k "chunks:chunks:warps"
    step bench_rls 80 python3 benchmarks/second_order_gpu.py --layers mesa_cg rls --no-peer \
        --rls-algorithms chunks:chunks:warps
    tail -n 15 "$OUT/rls_tests.txt"
    cat "$OUT/bench_rls.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == launch_sweep ]]; then  # mesa_cg's launch table (cg_triton.LAUNCH): each entry's warps x stages
    # varied alone, forward and forward+backward at both shapes (gap: to the table as set), against fla's rows
    step bench_mesa 170 python3 benchmarks/second_order_gpu.py --layers mesa_cg \
        --launch gradient:4x1 gradient:16x1 cg:8x1 scan:2x1
    cat "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == mlp_train ]]; then  # ttt_mlp trains on the kernels at K = 64 (its GPU test passed): the MLP memories'
    # rows, then where mesa_cg's training step goes at B=2 T=8192 (the shape where it trails fla) with the walk's launch
    step bench_mlp 260 python3 benchmarks/online_gpu.py --layers ttt_linear ttt_mlp titans_mlp
    step bench_mesa 150 python3 benchmarks/second_order_gpu.py --layers mesa_cg --shapes 2x8192 --profile mesa_cg \
        --launch scan:8x1 scan:2x1 gradient:4x1 gradient:16x1
    cat "$OUT/bench_mlp.txt" "$OUT/bench_mesa.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == affine_short ]]; then  # affine_first within little device time: the tests without the longest
    # sequences, the conjugate-gradient rows against fla (affine_mesa_cg profiled), ttt_linear's rows
    step cg_tests 140 timeout -s INT 130 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096 and not 1000"
    step bench_mesa 130 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg --profile affine_mesa_cg
    step bench_online 100 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 4x2048 2x8192
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cg_tests.txt" | tail -n 30
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == affine_tiny ]]; then  # the least of affine_first: the affine and mesa GPU tests at T = 63 and packed,
    # then both layers' rows at one shape against fla
    step cg_tests 100 timeout -s INT 95 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "63 or packed"
    step bench_mesa 100 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg --shapes 4x2048
    step bench_online 80 python3 benchmarks/online_gpu.py --layers ttt_linear --shapes 4x2048 2x8192
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cg_tests.txt" | tail -n 30
    cat "$OUT/bench_mesa.txt" "$OUT/bench_online.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == cg_quick ]]; then  # the conjugate-gradient layers alone: timed against fla, profiled, their GPU tests
    step bench_mesa 200 python3 benchmarks/second_order_gpu.py --layers mesa_cg affine_mesa_cg --profile mesa_cg \
        --launch scan:8x1 scan:4x2
    step cg_tests 200 timeout -s INT 190 python3 -m pytest -m gpu tests/gpu/test_second_order_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short -k "not 4096"
    cat "$OUT/bench_mesa.txt"
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/cg_tests.txt" | tail -n 30
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == second_order_tests ]]; then  # the nonlinear memories' and the conjugate-gradient layers' GPU tests
    step second_order_tests 550 timeout -s INT 530 python3 -m pytest -m gpu tests/gpu/test_online_gpu.py \
        tests/gpu/test_second_order_gpu.py -q -p no:cacheprovider -n 8 -rfE --tb=short ${ONLINE_TESTS:+-k "$ONLINE_TESTS"}
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/second_order_tests.txt" | tail -n 40
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == online_tests ]]; then  # their GPU tests, each result printed as it comes (-v); stopped early enough
    # for pytest to print its failures' summary
    seconds=${ONLINE_TESTS_SECONDS:-480}
    step online_tests $((seconds + 20)) timeout -s INT "$seconds" python3 -m pytest -m gpu tests/gpu/test_online_gpu.py -v \
        -p no:cacheprovider -n 8 -rfE --tb=short ${ONLINE_TESTS:+-k "$ONLINE_TESTS"}
    grep -E "FAILED|ERROR|Error|assert|passed|failed" "$OUT/online_tests.txt" | tail -n 40
    cat "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == attention ]]; then  # the attention kernels: GPU tests, then peers (fla's autotuning last)
    step attention_tests 180 timeout -s INT 170 python3 -m pytest -m gpu tests/gpu/test_flash_gpu.py -q \
        -p no:cacheprovider -n 8 -rfE --tb=short
    step bench_attention 220 python3 benchmarks/attention_gpu.py --layers softmax window gaussian local_linear \
        --csv "$OUT/attention.csv"
    step bench_forgetting 120 python3 benchmarks/attention_gpu.py --layers forgetting --csv "$OUT/forgetting.csv"
    tail -n 25 "$OUT/attention_tests.txt"
    cat "$OUT/bench_attention.txt" "$OUT/bench_forgetting.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == tune_attention ]]; then  # the local-constant kernels' launch tables, a training step
    step tune_attention 270 python3 benchmarks/tune_gpu.py softmax_attention --B 4 --T 4096 --backward
    cat "$OUT/tune_attention.txt" "$OUT/steps.txt"
    exit 0
fi
if [[ $WHAT == diagnose ]]; then  # per-kernel drift at the largest head, where a Hopper miscompile was found
    step diagnose 400 bash -c "for name in delta_rule gated_delta_rule delta_product; do
        python3 benchmarks/diagnose_backward_gpu.py \$name --dtype bfloat16 --K 256 --V 200; done"
    cat "$OUT/diagnose.txt" "$OUT/steps.txt"
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
