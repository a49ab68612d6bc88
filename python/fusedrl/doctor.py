"""`python -m fusedrl.doctor`: what this fusedrl install can do, for bug reports."""

from __future__ import annotations

import platform
import sys

import torch


def report() -> list[str]:
    import fusedrl

    lines = [f"fusedrl {fusedrl.__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    try:
        from fusedrl import _ext
        import fusedrl.ops  # noqa: F401  registers fakes and autograd

        lines.append(f"compiled ops: {_ext.library_path()}")
        lines.append(f"CUDA kernels: {_ext.build_info().get('cuda', 'none')}")
        for op in sorted(name for name in dir(torch.ops.fusedrl) if not name.startswith("_")):
            if op == "build_info" or not hasattr(getattr(torch.ops.fusedrl, op), "default"):
                continue
            keys = [key for key in ("CPU", "CUDA", "Meta", "Autograd")
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", key)]
            lines.append(f"  op fusedrl::{op}: {', '.join(keys)}")
    except ImportError as err:
        lines.append(f"compiled ops: MISSING ({err})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("GPU: none visible")
    for name in ("transformers", "peft", "datasets", "bitsandbytes", "vllm", "liger_kernel"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name}: not installed")
    return lines


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
