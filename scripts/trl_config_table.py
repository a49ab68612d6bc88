"""Writes docs/trl_config_fields.md: every TRL 1.16.0 GRPOConfig field, supported by fusedrl or not.

    PYTHONPATH=python python scripts/trl_config_table.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fusedrl.train.config import GRPOConfig
from fusedrl.train.trl_fields import markdown_table

TABLE = Path(__file__).resolve().parents[1] / "docs" / "trl_config_fields.md"

if __name__ == "__main__":
    TABLE.write_text(markdown_table(field.name for field in dataclasses.fields(GRPOConfig)))
    print(f"wrote {TABLE}")
