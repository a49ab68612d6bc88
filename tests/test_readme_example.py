"""The README's Python example runs as written, with only what needs the network swapped for local stand-ins: the
model id for a tiny random model saved to a folder, GSM8K from the Hub for a few local rows, and a run of one
step with short completions instead of three epochs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers

from fusedrl.model.tiny import tiny_word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    text = README.read_text()
    match = re.search(r"From Python:\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no 'From Python:' code block"
    return match.group(1)


def substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"the README example no longer contains {old!r}: update this test with it"
    return code.replace(old, new)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    tokenizer = tiny_word_tokenizer()
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)

    code = readme_python_example()
    code = substitute(code, '"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(tmp_path / "model")))
    code = substitute(code, 'load_gsm8k("train")', "LOCAL_ROWS")
    code = substitute(code, "max_completion_length=256", "max_completion_length=6, max_steps=1")
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "answer": str(2 * i)}
            for i in range(4)]
    exec(compile(code, "README.md", "exec"), {"LOCAL_ROWS": rows})

    run = tmp_path / "runs" / "qwen"
    assert (run / "metrics.jsonl").read_text().strip()
    assert any(path.name.startswith("checkpoint") for path in run.iterdir())
    assert (run / "merged" / "config.json").exists()
