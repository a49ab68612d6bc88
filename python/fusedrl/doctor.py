"""`python -m fusedrl.doctor`: what this fusedrl install can do, for bug reports."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys

import torch


# Provokes one argument error whose message formats numbers (the case that crashed a build carrying its own copy of
# libstdc++, issue 8) in a child process, so a crash is reported instead of taking the doctor down with it.
_ERROR_PROBE = """
import torch, fusedrl.ops
try:
    fusedrl.ops.selective_logp(torch.randn(2, 3, 8), torch.randn(11, 8), torch.full((2, 3), 99))
except RuntimeError as err:
    print("raised:", str(err).splitlines()[0])
"""


def error_probe(code: str = _ERROR_PROBE, timeout: float = 120.0) -> str:
    """One line: whether an op's argument error reaches Python as an exception, or how the process died."""
    try:
        probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"op errors: UNKNOWN (the probe did not finish in {timeout:.0f} s)"
    if probe.returncode == 0 and probe.stdout.startswith("raised:"):
        return f"op errors: raised cleanly ({probe.stdout.strip()[len('raised: '):]})"
    if probe.returncode < 0:
        how = f"killed by {signal.Signals(-probe.returncode).name}"
    else:
        how = f"exit {probe.returncode}: {(probe.stderr.strip().splitlines() or ['no output'])[-1]}"
    return (f"op errors: BROKEN, a bad argument {how} instead of raising; rebuild fusedrl and check that "
            "the build log does not warn about libstdc++")


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
        lines.append(error_probe())
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
