"""Makes `import fusedrl` work for a benchmark script: the installed package when there is one (the GPU machine
pip-installs it, with its compiled ops), else the source tree's python/ (built with scripts/dev_build.sh)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("fusedrl") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
