#!/usr/bin/env bash
# The GPU check (under 8 minutes on one CUDA GPU): what the CPU test suite cannot show.
#   1. bf16 LoRA on SmolLM2-135M through `turntune train`, rows of 8k tokens, with sdpa_varlen
#      and, if the flash-attn package imports, flash_attention_2;
#   2. the label-only LM head vs the full head at a 151,552 vocabulary on an 8k-token packed row;
#   3. FSDP2 with one process (nccl) against the whole model.
# Each prints a RESULT line with tokens/s and peak memory (bench/gpu_check.py says how measured).
#
#   bash bench/gpu_check.sh          # on a CUDA machine, after `make install`
#   bash bench/gpu_check.sh --cpu    # the CPU fallback at tiny sizes (also taken without CUDA)
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); the first run converts
# SmolLM2 from its GGUF into TURNTUNE_CACHE (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

CPU=()
if [ "${1:-}" = "--cpu" ]; then
    CPU=(--cpu)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here; running the CPU fallback (tiny sizes, float32: the figures mean nothing)"
    CPU=(--cpu)
fi
# LIMIT: one part at most; BUDGET: the whole script (GPU: under 8 minutes, the SmolLM2 conversion included)
if [ ${#CPU[@]} -gt 0 ]; then
    STEPS=3; LIMIT=400; BUDGET=1500
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
else
    STEPS=8; LIMIT=180; BUDGET=470
fi

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
part() {  # a part in its own process, with its own time limit: one slow part cannot eat the budget
    echo "== $*"
    local rc=0 left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then echo "gpu_check: SKIPPED (the ${BUDGET} s budget is spent)"; FAILED=1; return; fi
    timeout "$((left < LIMIT ? left : LIMIT))" "$@" >"$LOG" 2>&1 || rc=$?
    grep -E '^(RESULT|step [0-9]+/)' "$LOG" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 15 "$LOG"
        echo "gpu_check: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", out of time")): $*"
        FAILED=1
    fi
}

FAILED=0
start=$SECONDS
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no GPU)")'
part "$PY" bench/gpu_check.py lora --attn sdpa_varlen --steps "$STEPS" "${CPU[@]}"
if [ ${#CPU[@]} -eq 0 ] && "$PY" -c 'import flash_attn' 2>/dev/null; then
    part "$PY" bench/gpu_check.py lora --attn flash_attention_2 --steps "$STEPS"
else
    echo "== flash_attention_2: skipped (the flash-attn package does not import here, or no GPU)"
fi
part "$PY" bench/gpu_check.py head "${CPU[@]}"
part "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    bench/gpu_check.py fsdp --steps "$STEPS" "${CPU[@]}"
echo "gpu_check: done in $((SECONDS - start)) s; $([ "$FAILED" -eq 0 ] && echo "all parts passed" || echo "SOME PARTS FAILED")"
exit "$FAILED"
