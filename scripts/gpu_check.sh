#!/usr/bin/env bash
# One-call build + test + bench of fusedrl on the GPU machine (the device tool's `run`, repo root as cwd).
#
#   bash scripts/gpu_check.sh [--quick] [--no-bench] [--no-tests] [--tests PATTERN] [--bench-args "ARGS"]
#                             [--budget SECONDS] [--out DIR] [--cpu] [--step-bench] [--step-bench-args "ARGS"]
#                             [--benches loss,nf4,rollout,step]   (default loss,nf4,rollout; step also by --step-bench)
#
# Steps, each under its own time limit inside a total budget (default 540 s), each reported even when an
# earlier one failed:
#   1 wheels     carried .whl/*.whl -> pip install --no-index --no-deps --target /tmp/site, added to PYTHONPATH
#   2 build      pip install --no-build-isolation --no-deps -v .   (CUDA required, sm_90a only; the C++
#                microbenchmarks too when bench/cpp/CMakeLists.txt exists, retried without them if they break)
#   3 doctor     python -m fusedrl.doctor
#   4 tests      python -m pytest tests -m "cuda or errors" -q -rfEs --continue-on-collection-errors [-k PATTERN]
#   5 bench      bench/bench_grpo_loss.py [--quick] [ARGS] -> bench_grpo_loss.json (e.g. --bench-args
#                "--shapes llama3.1-8b --n-tokens 16384 --modes frozen_token,logprob")
#   5b bench_nf4 bench/bench_nf4.py -> bench_nf4.json, bench_nf4.log (NF4 + LoRA vs bitsandbytes + peft vs bf16)
#   5c step_bench  (only with --step-bench / --step-bench-args) bench/bench_step.py [ARGS] -> bench_step.json:
#                one whole GRPO step at long context, plain vs offloaded checkpointing vs a TRL-style step
#   5d rollout   bench/bench_rollout.py -> bench_rollout.json (static-cache CUDA-graph decode vs transformers generate)
#   6 cpp_bench  every executable the build left in build/*/bench/cpp
#   7 summary    a short table printed last (the device tool returns the end of the output)
# Files written to $OUT (at most 8 come back): build.log doctor.log tests.log tests.xml bench.log
# bench_grpo_loss.json cpp_bench.log summary.txt
# --cpu: a local dry run of this script without a GPU (CPU-only build, CUDA tests skipped, bench --cpu-smoke).
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

QUICK=0 NO_BENCH=0 NO_TESTS=0 CPU=0 TEST_PATTERN="" EXTRA_BENCH_ARGS="" BUDGET=540 OUT_DIR="${OUT:-}"
STEP_BENCH=0 STEP_BENCH_ARGS="" BENCHES="loss,nf4,rollout"
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-bench) NO_BENCH=1 ;;
    --benches) BENCHES="${2:?--benches needs a comma-separated list of loss,nf4,rollout,step}"; shift ;;
    --no-tests) NO_TESTS=1 ;;
    --bench-args) EXTRA_BENCH_ARGS="${2?--bench-args needs a quoted string of bench arguments}"; shift ;;
    --cpu) CPU=1 ;;
    --step-bench) STEP_BENCH=1 ;;
    --step-bench-args) STEP_BENCH=1; STEP_BENCH_ARGS="${2?--step-bench-args needs a quoted string}"; shift ;;
    --tests) TEST_PATTERN="${2:?--tests needs a pytest -k PATTERN}"; shift ;;
    --budget) BUDGET="${2:?--budget needs a number of seconds}"; shift ;;
    --out) OUT_DIR="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --quick, --no-bench, --no-tests, --tests PATTERN," \
            "--bench-args ARGS, --budget S, --out DIR, --cpu)" >&2
       exit 2 ;;
  esac
  shift
done
if [[ -z "$OUT_DIR" ]]; then
  echo "gpu_check.sh: no output folder: \$OUT is unset and --out DIR was not given" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY=python3
RESERVE=15   # seconds kept for the summary
STEP_NAMES=() STEP_STATUS=() STEP_SECONDS=()

record() { STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECONDS+=("$3"); }

# step_limit MAX: seconds a step may take: MAX, or what is left of the budget if less.
step_limit() {
  local left=$((BUDGET - SECONDS - RESERVE))
  ((left < $1)) && echo "$left" || echo "$1"
}

# run_logged LIMIT LOG CMD...: runs CMD under `timeout`, appending its output to LOG; returns CMD's status.
run_logged() {
  local limit=$1 log=$2
  shift 2
  echo "\$ $*" >>"$log"
  if ((limit < 5)); then
    echo "not run: the ${BUDGET}s budget is spent" >>"$log"
    return 125
  fi
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
}

status_of() {  # status_of RC: text for an exit status
  case "$1" in
    0) echo "ok" ;;
    124|137) echo "TIMEOUT" ;;
    125) echo "not run (budget spent)" ;;
    *) echo "FAILED (rc=$1)" ;;
  esac
}

echo "=== gpu_check: $(date -u +%FT%TZ) budget ${BUDGET}s out=$OUT_DIR"
if ((CPU)); then
  CARD="cpu (dry run)"
else
  CARD="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  CARD="${CARD:-no nvidia-smi}"
fi
VERSIONS="$($PY -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}")' 2>&1)"
echo "card: $CARD | $VERSIONS"

# ---- 1 wheels ----------------------------------------------------------------------------------------------
t0=$SECONDS
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]} == 0)); then
  record wheels "none carried" 0
else
  run_logged "$(step_limit 90)" "$OUT_DIR/build.log" $PY -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "${WHEELS[@]}"
  rc=$?
  if ((rc == 0)); then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    record wheels "ok (${#WHEELS[@]}: $(basename -a "${WHEELS[@]}" | sed 's/-py3.*//' | paste -sd' '))" $((SECONDS - t0))
  else
    record wheels "$(status_of $rc), see build.log" $((SECONDS - t0))
  fi
fi

# ---- 2 build -----------------------------------------------------------------------------------------------
t0=$SECONDS
# A warm machine may still hold the previous call's install: remove it, so a failed build leaves nothing stale.
$PY -m pip uninstall -y -q fusedrl >>"$OUT_DIR/build.log" 2>&1
BUILD_ARGS=(-C cmake.define.FUSEDRL_CUDA=ON -C cmake.define.FUSEDRL_CUDA_ARCHS=90a)
((CPU)) && BUILD_ARGS=(-C cmake.define.FUSEDRL_CUDA=OFF)
BENCH_DEFINE=()
[[ -f bench/cpp/CMakeLists.txt ]] && ((!CPU)) && BENCH_DEFINE=(-C cmake.define.FUSEDRL_BUILD_BENCH=ON)
run_logged "$(step_limit 300)" "$OUT_DIR/build.log" $PY -m pip install --no-build-isolation --no-deps -v \
  "${BUILD_ARGS[@]}" "${BENCH_DEFINE[@]}" .
rc=$?
BUILD_NOTE=""
if ((rc != 0 && rc != 124 && rc != 125 && rc != 137 && ${#BENCH_DEFINE[@]})); then
  echo "=== build with the C++ microbenchmarks failed (rc=$rc); retrying without them" | tee -a "$OUT_DIR/build.log"
  run_logged "$(step_limit 300)" "$OUT_DIR/build.log" $PY -m pip install --no-build-isolation --no-deps -v \
    "${BUILD_ARGS[@]}" .
  rc=$?
  BUILD_NOTE=" (C++ bench build failed)"
fi
BUILD_OK=$((rc == 0))
record build "$(status_of $rc)$BUILD_NOTE" $((SECONDS - t0))
if ((!BUILD_OK)); then
  echo "--- build.log: first error lines, then the last 10 lines"
  grep -nE '(error|Error|ERROR|FAILED)' "$OUT_DIR/build.log" | grep -v 'Werror' | head -n 15
  tail -n 10 "$OUT_DIR/build.log"
fi

# ---- 3 doctor ----------------------------------------------------------------------------------------------
t0=$SECONDS
run_logged "$(step_limit 60)" "$OUT_DIR/doctor.log" $PY -m fusedrl.doctor
rc=$?
record doctor "$(status_of $rc)" $((SECONDS - t0))
echo "--- doctor.log (last 15 lines)"
tail -n 15 "$OUT_DIR/doctor.log"

# ---- 4 tests -----------------------------------------------------------------------------------------------
t0=$SECONDS
# -rfEs: failures, errors and skip reasons in the short summary; a module that cannot be imported here (a
# package the GPU machine lacks) must not stop the CUDA tests of the other modules.
# "errors": the argument-error tests run here for CPU tensors too (a CUDA build once crashed on them, issue 8).
TEST_ARGS=(tests -m "cuda or errors" -q -rfEs --continue-on-collection-errors --junitxml="$OUT_DIR/tests.xml")
if ((NO_TESTS)); then
  record tests "skipped (--no-tests)" 0
else
  [[ -n "$TEST_PATTERN" ]] && TEST_ARGS+=(-k "$TEST_PATTERN")
  run_logged "$(step_limit 180)" "$OUT_DIR/tests.log" $PY -m pytest "${TEST_ARGS[@]}"
  rc=$?
  TEST_LINE="$(grep -v '^\$ ' "$OUT_DIR/tests.log" | grep -E '(passed|failed|error|skipped|deselected|no tests ran)' | tail -1 |
    tr -d '=' | sed 's/^ *//')"
  case "$rc" in
    0|1|5) record tests "${TEST_LINE:-rc=$rc}" $((SECONDS - t0)) ;;
    *) record tests "$(status_of $rc) ${TEST_LINE}" $((SECONDS - t0)) ;;
  esac
  if ((rc == 1 || rc == 2)); then
    echo "--- failing tests / collection errors"
    grep -E '^(FAILED|ERROR)' "$OUT_DIR/tests.log" | head -20
  fi
fi

# ---- 5 bench -----------------------------------------------------------------------------------------------
BENCH_JSON="$OUT_DIR/bench_grpo_loss.json"
wants() { [[ ",$BENCHES," == *",$1,"* ]]; }  # wants NAME: NAME is in --benches
wants step && STEP_BENCH=1
if ((NO_BENCH)) || ! wants loss; then
  record bench "skipped (--no-bench or not in --benches)" 0
else
  t0=$SECONDS
  limit="$(step_limit 330)"
  BENCH_ARGS=(--json "$BENCH_JSON" --time-budget $((limit > 90 ? limit - 45 : limit / 2)))
  ((QUICK)) && BENCH_ARGS+=(--quick)
  ((CPU)) && BENCH_ARGS+=(--cpu-smoke)
  read -r -a EXTRA <<<"$EXTRA_BENCH_ARGS"
  BENCH_ARGS+=("${EXTRA[@]}")
  run_logged "$limit" "$OUT_DIR/bench.log" $PY bench/bench_grpo_loss.py "${BENCH_ARGS[@]}"
  rc=$?
  record bench "$(status_of $rc)" $((SECONDS - t0))
fi

# ---- 5b NF4 bench ------------------------------------------------------------------------------------------
if ((!NO_BENCH)) && wants nf4 && [[ -f bench/bench_nf4.py ]]; then
  t0=$SECONDS
  limit="$(step_limit 240)"
  NF4_ARGS=(--json "$OUT_DIR/bench_nf4.json" --time-budget $((limit > 60 ? limit - 40 : limit / 2)))
  ((QUICK)) && NF4_ARGS+=(--models llama3.1-8b --tokens 1,8,4096)
  ((CPU)) && NF4_ARGS=(--cpu-smoke --json "$OUT_DIR/bench_nf4.json")
  run_logged "$limit" "$OUT_DIR/bench_nf4.log" $PY bench/bench_nf4.py "${NF4_ARGS[@]}"
  rc=$?
  record bench_nf4 "$(status_of $rc) $(grep -E '^targets:' "$OUT_DIR/bench_nf4.log" | tail -1)" $((SECONDS - t0))
fi

# ---- 5d rollout bench (static decode loop vs transformers generate) -------------------------------------------
if ((!NO_BENCH)) && wants rollout && [[ -f bench/bench_rollout.py ]]; then
  t0=$SECONDS
  limit="$(step_limit 240)"
  ROLLOUT_ARGS=(--json "$OUT_DIR/bench_rollout.json" --time-budget $((limit > 90 ? limit - 60 : limit / 2)))
  ((CPU)) && ROLLOUT_ARGS+=(--cpu-smoke)
  run_logged "$limit" "$OUT_DIR/bench_rollout.log" $PY bench/bench_rollout.py "${ROLLOUT_ARGS[@]}"
  rc=$?
  record rollout "$(status_of $rc)" $((SECONDS - t0))
fi

# ---- 5c whole-step bench (opt-in) --------------------------------------------------------------------------
if ((STEP_BENCH && !NO_BENCH)); then
  t0=$SECONDS
  limit="$(step_limit 330)"
  STEP_ARGS=(--json "$OUT_DIR/bench_step.json" --time-budget $((limit > 90 ? limit - 60 : limit / 2)))
  ((CPU)) && STEP_ARGS+=(--cpu-smoke)
  read -r -a EXTRA <<<"$STEP_BENCH_ARGS"
  STEP_ARGS+=("${EXTRA[@]}")
  run_logged "$limit" "$OUT_DIR/bench_step.log" $PY bench/bench_step.py "${STEP_ARGS[@]}"
  rc=$?
  record step_bench "$(status_of $rc)" $((SECONDS - t0))
  grep -E '^(target|plan vs)' "$OUT_DIR/bench_step.log" | head -12
fi

# ---- 6 C++ microbenchmarks -------------------------------------------------------------------------------------
t0=$SECONDS
mapfile -t CPP_BENCHES < <(find build -maxdepth 4 -path '*/bench/cpp/*' -type f -executable ! -name '*.so' \
  2>/dev/null | sort)
if ((${#CPP_BENCHES[@]} == 0)); then
  record cpp_bench "skipped (none built)" 0
else
  failed=0
  for exe in "${CPP_BENCHES[@]}"; do
    echo "=== $exe" >>"$OUT_DIR/cpp_bench.log"
    run_logged "$(step_limit 90)" "$OUT_DIR/cpp_bench.log" "$exe" || failed=$((failed + 1))
  done
  record cpp_bench "$(( ${#CPP_BENCHES[@]} - failed ))/${#CPP_BENCHES[@]} ran ok" $((SECONDS - t0))
fi

# ---- 7 summary ---------------------------------------------------------------------------------------------
{
  echo
  echo "================ gpu_check summary: $CARD | ${SECONDS}s of ${BUDGET}s ================"
  printf '%-10s %6s  %s\n' step sec status
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-10s %6s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_STATUS[$i]}"
  done
  if [[ -s "$BENCH_JSON" ]]; then
    $PY - "$BENCH_JSON" <<'EOF'
"""Key rows of bench_grpo_loss.json: every configuration at the target N (else the largest N run)."""
import json, sys

data = json.load(open(sys.argv[1]))
rows = data["rows"]
if not rows:
    print("bench: no rows"); sys.exit()
target = data["meta"].get("target_n")
n_key = target if any(r["n_tokens"] == target for r in rows) else max(r["n_tokens"] for r in rows)
print(f"-- bench at N={n_key} on {data['meta']['device']} (ms | x floor | peak GiB | speedup vs naive)")
for r in rows:
    if r["n_tokens"] != n_key:
        continue
    if r.get("status") != "ok":
        print(f"{r['shape']:12s} {r['mode']:16s} {r['impl']:8s} {r['status'][:70]}")
        continue
    cells = [f"{r['ms']:8.2f} ms"]
    for key, spec in (("floor_x", ".2f"), ("peak_extra_gib", ".3f"), ("speedup_vs_naive", ".2f")):
        cells.append("-" if r.get(key) is None else format(r[key], spec))
    print(f"{r['shape']:12s} {r['mode']:16s} {r['impl']:8s} " + " | ".join(cells))
for c in data.get("targets", []):
    mem = "" if c["target_extra_gib"] is None or c["peak_extra_gib"] is None else (
        f", extra {c['peak_extra_gib']:.3f} GiB (<= {c['target_extra_gib']})")
    print(f"target {'PASS' if c['passed'] else 'FAIL'} {c['shape']} {c['mode']}: {c['floor_x']:.2f} x floor "
          f"(<= {c['target_x']}){mem}")
EOF
  fi
} | tee "$OUT_DIR/summary.txt"

for status in "${STEP_STATUS[@]}"; do
  [[ "$status" == FAILED* || "$status" == TIMEOUT* ]] && exit 1
done
[[ -s "$OUT_DIR/tests.log" ]] && grep -qE '[0-9]+ (failed|error)' "$OUT_DIR/tests.log" && exit 1
exit 0
