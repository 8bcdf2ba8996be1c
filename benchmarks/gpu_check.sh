#!/usr/bin/env bash
# GPU check (issue #7): one CUDA GPU, no network, under 5 minutes end to end.
#   1 environment           what is importable, the torch build, the card
#   2 cuda tests            python -m pytest -m cuda tests (every CUDA-marked test)
#   3 pure-fp16 vs mixed    embedded default: pure-fp16 corrupts the weights (optimizer_eps_underflow), mixed
#                           (fp32 masters, a real GradScaler) trains; `sarkd-diag check` tells them apart
#   4 tokens/s              the gpt2 pair (DialoGPT-medium/small shapes) in fp32, mixed and bf16-mixed
#   5 estimate-memory ratio `estimate-memory` for that pair against the measured max_memory_allocated
# Nothing is downloaded or installed from the network: the package goes on PYTHONPATH, `datasets` is never
# imported (embedded assets only), and wheels carried along in GPU_CHECK_WHEELS (pure-Python ones such as
# typer, rich) are unpacked offline into a scratch directory put on PYTHONPATH.
#
#   bash benchmarks/gpu_check.sh                        # PYTHON=python3, OUT=/tmp/gpu_check
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps with tiny settings: the plumbing only
#
# Writes OUT/gpu_check.log, OUT/figures.md (for the README), OUT/figures.json and each step's JSON.
# Exit: 0 every step passed, 1 a step failed, 2 none failed but one was skipped (missing dependency, no time).
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
BUDGET=${GPU_CHECK_BUDGET:-$([[ $DEVICE == cpu ]] && echo 1200 || echo 280)}  # seconds for all the steps
HELPER=benchmarks/gpu_check.py
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TRAIN_DEPS="device torch transformers tokenizers safetensors pandas pyarrow matplotlib rich sarkd_diag"

section() { printf '\n==== %s ====\n' "$*"; }

step() {  # step NAME LIMIT_S "DEPENDENCIES" COMMAND...: COMMAND under timeout, unless a dependency is missing
    local name=$1 limit=$2 deps=$3 missing="" dep var status rc start=$SECONDS
    shift 3
    section "$name"
    [[ -f $OUT/have.env ]] && source "$OUT/have.env"  # HAVE_<package>=0/1, HAVE_device, written by step 1
    for dep in $deps; do
        var=HAVE_$dep
        [[ ${!var:-0} == 1 ]] || missing+=" $dep"
    done
    ((limit > BUDGET - SECONDS)) && limit=$((BUDGET - SECONDS))
    if [[ -n $missing ]]; then
        echo "SKIP $name: missing$missing"; status=SKIP
    elif ((limit < 10)); then
        echo "SKIP $name: the ${BUDGET} s budget is spent"; status=SKIP
    else
        timeout -k 10 "$limit" "$@"; rc=$?
        if ((rc == 0)); then status=PASS
        elif ((rc == 124 || rc == 137)); then echo "FAIL $name: timed out after $limit s"; status=FAIL
        else echo "FAIL $name: exit $rc"; status=FAIL; fi
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) >> "$OUT/steps.tsv"
    echo "---- $name: $status ($((SECONDS - start)) s)"
}

main() {
    section "gpu_check: device $DEVICE, budget $BUDGET s, PYTHON $PYTHON, OUT $OUT, $(date -u '+%F %T UTC')"
    rm -f "$OUT/steps.tsv" "$OUT/have.env" "$OUT"/speed-*.json "$OUT"/{env,fp16,memory,figures}.json
    if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then  # offline only: --no-index never reaches a package index
        local site=/tmp/gpu_check_site
        "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$GPU_CHECK_WHEELS"/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$site" || echo "WARNING: could not unpack the wheels in $GPU_CHECK_WHEELS"
    fi
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

    step "1 environment" 60 "" "$PYTHON" $HELPER env --device "$DEVICE"
    step "2 cuda tests" 120 "$TRAIN_DEPS typer pytest" \
        "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs tests
    step "3 pure-fp16 vs mixed" 90 "$TRAIN_DEPS typer" "$PYTHON" $HELPER fp16 --device "$DEVICE"
    for precision in fp32 mixed bf16-mixed; do
        step "4 tokens/s $precision" 75 "$TRAIN_DEPS" "$PYTHON" $HELPER speed --device "$DEVICE" --precision "$precision"
    done
    step "5 estimate-memory ratio" 45 "$TRAIN_DEPS typer" "$PYTHON" $HELPER memory --device "$DEVICE"

    section "figures (also in $OUT/figures.md)"
    "$PYTHON" $HELPER report --device "$DEVICE"
    local failed skipped
    failed=$(grep -c $'\tFAIL\t' "$OUT/steps.tsv")
    skipped=$(grep -c $'\tSKIP\t' "$OUT/steps.tsv")
    section "done in $SECONDS s: $failed failed, $skipped skipped (log: $OUT/gpu_check.log)"
    ((failed)) && return 1
    ((skipped)) && return 2
    return 0
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
