#!/usr/bin/env bash
# The GPU checks of the speed-and-memory issue, in ONE call to a lent GPU machine.
#
# Such a machine is lent for minutes and starts bare, with its own Python and torch (an image with
# CUDA, PyTorch, einops, jaxtyping, hypothesis and pytest, but not beartype or MONAI). So the work is split:
#
#   here, once:   bash benchmarks/gpu_session.sh --prepare
#                 (downloads the wheels that image lacks into .whl/, which git ignores)
#   there:        bash benchmarks/gpu_session.sh            (carry .whl; about 6 minutes on an H100/H200)
#   here, to try: bash benchmarks/gpu_session.sh --smoke    (the same steps on this CPU, at 64x64)
#
# What runs, in this order (the most needed first, each under its own time limit, so a hang or a
# slow part still leaves the others' output; the whole stays under BUDGET_S seconds):
#   1. the tests marked `gpu` (CUDA against CPU outputs and gradients, checkpointing and bf16 on CUDA,
#      the planner's peak against torch.cuda.max_memory_allocated within 10%, fp16 attention with upcast);
#   2. benchmarks/bench_gpu_step.py at the full (1, 1, 8, 256, 256): every variant's time,
#      max_memory_allocated and the planner's prediction, MONAI beside ours (results/gpu_step.json);
#   3. bench_gpu_step.py --snapshot: what is allocated at the peak of an fp32 step, at 256 and at
#      the 128 of the planner's GPU test, beside the planner's peak (the 256 snapshot's pickle too);
#   4. bench_gpu_step.py --profile: the CUDA kernels and the CPU time of one bf16-autocast step;
#   5. bench_gpu_step.py --compile: eager vs torch.compile (results/gpu_step_compile.json; its
#      first step compiles for about two minutes).
# PARTS names the parts to run (default: all, "tests bench snapshot profile compile"), e.g.
# PARTS="tests bench" for a short call.
# Logs and results are copied to $OUT (the folder the device tool brings back), or to a temporary
# folder elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."

# Wheels for packages the GPU image lacks (pure Python, so one wheel serves any Python 3).
WHEELS=("beartype==0.23.1" "monai==1.6.1")

case "${1:-run}" in
    --prepare)
        mkdir -p .whl
        python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
        ls .whl
        exit 0 ;;
    --smoke) smoke=1 ;;
    run) smoke=0 ;;
    *) echo "gpu_session.sh: expected --prepare, --smoke or no argument, got '$1'." >&2; exit 2 ;;
esac

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
if [ "$smoke" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt" || status=1
import torch, cpcbm_blocks
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("cpcbm_blocks imported from", cpcbm_blocks.__file__)
EOF

BUDGET_S="${BUDGET_S:-500}"
PARTS=" ${PARTS:-tests bench snapshot profile compile} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
left() { echo $(( BUDGET_S - SECONDS > 0 ? BUDGET_S - SECONDS : 1 )); }
# `timeout` for a part: its own limit or what is left of the budget, whichever is less.
limit() { local own=$1; local rest; rest=$(left); echo $(( own < rest ? own : rest )); }

# Only the modules that hold `gpu` tests: collecting the docs tests would import the docs toolchain.
if part tests; then
    timeout "$(limit 120)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py tests/test_memory.py \
        tests/test_numerics.py -rs 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
fi

cd benchmarks
if [ "$smoke" = 1 ]; then
    bench=(--device cpu --size 64 --repeats 1)
    timeout 300 python3 bench_gpu_step.py "${bench[@]}" 2>&1 | tee "$OUT/bench_gpu_step.log" || status=1
    timeout 120 python3 bench_gpu_step.py "${bench[@]}" --profile 2>&1 | tail -45 | tee "$OUT/profile.log" || status=1
else
    if part bench; then
        timeout "$(limit 200)" python3 bench_gpu_step.py --repeats 10 2>&1 | tee "$OUT/bench_gpu_step.log" || status=1
        cp results/gpu_step.json "$OUT/" 2>/dev/null || status=1
    fi
    if part snapshot; then
        for size in 256 128; do
            timeout "$(limit 120)" python3 bench_gpu_step.py --snapshot "default, fp32" --size "$size" \
                $([ "$size" = 256 ] && echo --snapshot-file "$OUT/snapshot_fp32_256.pickle") 2>&1 \
                | tee -a "$OUT/snapshot.log" || status=1
        done
    fi
    if part profile; then
        timeout "$(limit 60)" python3 bench_gpu_step.py --profile 2>&1 | tee "$OUT/profile.log" || status=1
    fi
    if part compile; then
        timeout "$(limit 240)" python3 bench_gpu_step.py --compile --repeats 10 2>&1 | tee "$OUT/bench_gpu_compile.log" \
            || status=1
        cp results/gpu_step_compile.json "$OUT/" 2>/dev/null || status=1
    fi
fi
echo "gpu_session.sh: results in $OUT after ${SECONDS} s (exit $status)"
exit $status
