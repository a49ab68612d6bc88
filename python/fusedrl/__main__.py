"""`python -m fusedrl ...` runs the `fusedrl` command (see fusedrl.cli)."""

import sys

from fusedrl.cli import main

sys.exit(main())
