#!/usr/bin/env bash
# The GPU check of the "Core v2" issue, in one command: the device-parametrised tests and the
# loss-overhead benchmark (time, peak memory, graph breaks) on CUDA, every output in $OUT.
#
# Run (from any directory; the repository is found from this file's place):
#     bash tools/device_check.sh              # writes into $OUT, or ./device_out if OUT is unset
#     bash tools/device_check.sh --dry-run    # prints the commands and their limits, runs nothing
#
# Assumes, and installs nothing:
#   * bash, coreutils' `timeout`; `nvidia-smi` is printed when present (not required);
#   * $PYTHON (default python3) imports torch built with CUDA, sees a GPU (checked first, by
#     tools/device_env.py), and imports the package's dependencies (numpy, pyyaml, tqdm, ...;
#     pytest for the tests step). The package itself is taken from this copy's src/
#     (PYTHONPATH), not from an installed copy; nothing is written outside $OUT.
# Stops after the environment step (exit 3) when torch cannot see a GPU; otherwise runs every
# step, each under its own wall-clock limit (seconds, overridable: T_ENV, T_TESTS, T_TIME,
# T_MEMORY, T_GRAPH), so that a slow step cannot eat the others' time: about 8 minutes at
# most in all (T_* in seconds). Exit 0 when every step passed, 1 when one failed or ran out of time (124).
#
# Outputs (text / markdown) in $OUT: summary.md (one row per step: exit status, seconds, file),
# nvidia-smi.txt, environment.txt, tests_cuda.txt, loss_overhead_time.md,
# loss_overhead_memory.md, loss_overhead_graph_breaks.md. The benchmark prints each row as it
# is measured, so a step stopped by its limit keeps the rows it finished.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "device_check: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

OUT="${OUT:-device_out}"
case "$OUT" in
    /*) ;;
    *) OUT="$PWD/$OUT" ;; # relative to where the script was called from, not the repository
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# every line reaches its log file as it is printed: a step stopped at its limit keeps them
export PYTHONUNBUFFERED=1

# per-step limits in seconds (sum 480 s, with nvidia-smi's 20 s and at most 10 s of grace per
# step: under 9 minutes in the worst case)
T_ENV="${T_ENV:-30}"
T_TESTS="${T_TESTS:-200}"
T_TIME="${T_TIME:-120}"
T_MEMORY="${T_MEMORY:-80}"
T_GRAPH="${T_GRAPH:-50}"

# The tests that take a GPU when there is one: CUDA cases of the benchmark, potential, augment
# and checkpoint tests, the RNG state capture (which saves CUDA's state when it is initialised),
# the distributed helpers' device choice, and compile (every loss and call form compiled =
# eager on CUDA tensors: the longest, so last). Elsewhere they skip; `--maxfail` keeps the log
# short, the step's limit bounds the time.
TEST_FILES=(
    tests/test_benchmark_loss_overhead.py
    tests/test_potential.py
    tests/test_augment.py
    tests/test_checkpoint.py
    tests/test_checkpoint_rng.py
    tests/test_distributed.py
    tests/test_compile.py
)
TEST_SELECTION="cuda or checkpoint_rng or test_single_process_is_a_no_op"

BENCH=(benchmarks/loss_overhead.py --device cuda)

FAILED=()

# show ARG...: the command as one line a shell would run again (quotes only where needed)
show() {
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./,:=+@%-]+$ ]]; then
            out+="$arg "
        else
            out+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${out% }"
}

# run_step NAME SECONDS FILE COMMAND...: COMMAND under `timeout`, stdout and stderr in
# $OUT/FILE, a row in summary.md; a failure is recorded, not fatal (set -e stays for the rest)
run_step() {
    local name="$1" limit="$2" file="$3"
    shift 3
    local shown
    shown="$(show "$@")"
    if ((DRY_RUN)); then
        echo "[$name] timeout -k 10 $limit $shown > $OUT/$file"
        return 0
    fi
    echo "[$name] (limit ${limit} s) $shown"
    local start=$SECONDS rc=0
    {
        echo "\$ $shown"
        echo
        timeout -k 10 "$limit" "$@"
    } >"$OUT/$file" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    local note=""
    if ((rc == 124 || rc == 137)); then
        note=" (stopped at the ${limit} s limit)"
    fi
    echo "| $name | $rc$note | $took | $limit | $file |" >>"$OUT/summary.md"
    echo "[$name] exit $rc$note after ${took} s -> $OUT/$file"
    if ((rc != 0)); then
        FAILED+=("$name")
    fi
    return 0
}

if ((!DRY_RUN)); then
    if ! command -v timeout >/dev/null; then
        echo "device_check: stopped: coreutils' timeout is not on PATH" >&2
        exit 3
    fi
    mkdir -p "$OUT"
    {
        echo "# Device check"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -n), $(nproc) CPU(s), commit" \
            "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here)')"
        echo
        echo "| step | exit | seconds | limit (s) | output |"
        echo "|---|---|---|---|---|"
    } >"$OUT/summary.md"
fi

if ((DRY_RUN)); then
    echo "[nvidia-smi] timeout -k 5 20 nvidia-smi > $OUT/nvidia-smi.txt"
elif command -v nvidia-smi >/dev/null; then
    timeout -k 5 20 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi: exit $?)" >>"$OUT/nvidia-smi.txt"
    cat "$OUT/nvidia-smi.txt"
else
    echo "nvidia-smi: not on PATH" | tee "$OUT/nvidia-smi.txt"
fi

run_step environment "$T_ENV" environment.txt "$PY" tools/device_env.py
if ((!DRY_RUN)); then
    cat "$OUT/environment.txt"
    if ((${#FAILED[@]})); then
        echo "device_check: stopped: torch with a usable GPU (and the package) is needed;" \
            "see $OUT/environment.txt (last line: $(tail -n 1 "$OUT/environment.txt"))" >&2
        exit 3
    fi
fi

run_step tests "$T_TESTS" tests_cuda.txt \
    "$PY" -m pytest -q -p no:cacheprovider --maxfail=3 "${TEST_FILES[@]}" -k "$TEST_SELECTION"
# N = 256 / 512 / 1024, in-batch and a pool of K = 4096, 5 rounds (fast cells run more, up to
# 3 s each), with the product floor
run_step time "$T_TIME" loss_overhead_time.md \
    "$PY" "${BENCH[@]}" --sizes 256,512,1024 --pools 0,4096 --repeats 5 --warmup 2 \
    --no-memory --no-graph-breaks
# the default cells (N = 4096 in-batch, N = 1024 with a pool of 65536), a process per loss,
# up to 8 at a time
run_step memory "$T_MEMORY" loss_overhead_memory.md "$PY" "${BENCH[@]}" --sizes "" --no-graph-breaks
run_step graph-breaks "$T_GRAPH" loss_overhead_graph_breaks.md \
    "$PY" "${BENCH[@]}" --sizes "" --no-memory

if ((DRY_RUN)); then
    exit 0
fi
cat "$OUT/summary.md"
if ((${#FAILED[@]})); then
    echo "device_check: failed or stopped: ${FAILED[*]} (see the files in $OUT)" >&2
    exit 1
fi
echo "device_check: every step passed; outputs in $OUT"
