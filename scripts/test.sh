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
