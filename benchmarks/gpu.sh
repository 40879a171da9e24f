#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine: at most 10 minutes on one H100/H200 (each
# step's limit below; about 8 expected).
#
#   bash benchmarks/gpu.sh OUT            # on the GPU machine; everything lands in OUT/
#   bash benchmarks/gpu.sh OUT --dry-run  # the same steps on the CPU at tiny sizes (the test suite)
#
# Steps, each under its own time limit, each logged to OUT/<step>.log; a failed step is reported
# and the next one runs, so one broken path cannot cost the others their GPU time:
#   1. environment.json: GPU, driver, torch, CUDA, DeepSpeed, transformers, peft (stops here,
#      with one sentence, when CUDA or a package is missing);
#   2. compare.py --device cuda --bf16 on the 1B and 7B Llama shapes (random weights from configs);
#   3. versus.py on 1 GPU, 7B: SMT-1% against LoRA at the same count, ZeRO-2 and FSDP2;
#   4. scale_memory.py --device cuda, 1B, ZeRO-3 offload and FSDP2 offload: each phase's CUDA
#      peak as a fraction of the model's bytes;
#   5. quantized.py: SMT against QLoRA on the same NF4 base; on CUDA, the quantized layer's tests;
#   6. summary.md: the figures, and the analytic model's prediction beside each measured peak.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu.sh OUT [--dry-run]}
MODE=${2:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)

if [[ "$MODE" == "--dry-run" ]]; then
    DEVICE=cpu SMALL=tiny LARGE=tiny VERSUS=tiny SCALE=tiny PRECISION="" SCALE_UP=3
    QUICK=(--steps 1 --warmup-steps 0 --smt-warmup 1 --seq 64)
elif [[ -n "$MODE" ]]; then
    echo "gpu.sh: unknown option $MODE (only --dry-run)" >&2
    exit 2
else
    DEVICE=cuda SMALL=1b LARGE=7b VERSUS=7b SCALE=1b PRECISION=--bf16 SCALE_UP=1
    QUICK=(--steps 5 --warmup-steps 2 --smt-warmup 4 --seq 512)
fi

for tool in timeout torchrun deepspeed; do
    command -v "$tool" > /dev/null || { echo "gpu.sh: $tool is not on PATH; run \`bash scripts/setup.sh\` first." >&2; exit 2; }
done
"$PYTHON" benchmarks/gpu_report.py env --device "$DEVICE" --out "$OUT/environment.json" > /dev/null || exit 2
echo "environment: $(cat "$OUT/environment.json")"

failed=0
step() {  # step NAME SECONDS COMMAND...: run under its time limit (GPU seconds), log, report
    local name=$1 limit=$(($2 * SCALE_UP))
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "ok     $name ($((SECONDS - start)) s)"
    else
        echo "FAILED $name ($((SECONDS - start)) s, exit $?): see $OUT/$name.log"
        tail -n 5 "$OUT/$name.log" | sed 's/^/       /'
        failed=$((failed + 1))
    fi
}

declare -A COMPARE_LIMIT=([$SMALL]=120 [$LARGE]=240)
for size in "$SMALL" "$LARGE"; do
    step "compare_$size" "${COMPARE_LIMIT[$size]}" "$PYTHON" benchmarks/compare.py --size "$size" --device "$DEVICE" $PRECISION \
        "${QUICK[@]}" --json "$OUT/compare_$size.json"
    [[ "$SMALL" == "$LARGE" ]] && break
done
step versus 120 "$PYTHON" benchmarks/versus.py --size "$VERSUS" --world 1 --device "$DEVICE" $PRECISION \
    --engines zero2,fsdp --methods smt-1,lora-1 "${QUICK[@]}" --json "$OUT/versus.json"
step scale_memory 120 "$PYTHON" benchmarks/scale_memory.py --sizes "$SCALE" --world 1 --device "$DEVICE" $PRECISION \
    --configs zero3_offload,fsdp_offload --models_dir "$OUT/models" --out "$OUT/scale_memory.json"
rm -rf "$OUT/models"  # gigabytes of random weights; the figures are in the JSON
# A 4-bit base: SMT against QLoRA on bitsandbytes' CUDA kernels, and the layer against its dense
# reference there (on the CPU the same test runs the CPU kernels and skips its CUDA case).
step quantized 120 "$PYTHON" benchmarks/quantized.py --size "$SMALL" --device "$DEVICE" $PRECISION --rounds 1 \
    "${QUICK[@]}" --skip-selection --skip-accuracy --json "$OUT/quantized.json"
[[ "$DEVICE" == cuda ]] && step quantized_layer 120 "$PYTHON" -m pytest -q -m gpu tests/core/test_quantized.py
"$PYTHON" benchmarks/gpu_report.py report "$OUT" > /dev/null && echo "wrote $OUT/summary.md"
exit $((failed > 0))
