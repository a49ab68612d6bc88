"""Every op the library registers has its pieces: CPU and CUDA kernels, a fake, a Python face, a float64
reference, tests and benchmarks (CONTRIBUTING section 7). Registrations are read from torch's dispatcher."""

from __future__ import annotations

from pathlib import Path

import torch

import fusedrl.ops  # noqa: F401  registers fakes and autograd
from fusedrl import _ext

ROOT = Path(__file__).resolve().parents[2]
# op -> (Python face module, reference function, test file, benchmark)
OPS = {
    "fused_linear_logp": ("python/fusedrl/ops/linear_logp.py", "selective_logp_reference",
                          "tests/ops/test_linear_logp.py", "bench/bench_grpo_loss.py"),
    "fused_linear_logp_backward": ("python/fusedrl/ops/linear_logp.py", "selective_logp_reference",
                                   "tests/ops/test_linear_logp.py", "bench/bench_grpo_loss.py"),
    "fused_linear_token_loss": ("python/fusedrl/ops/trainable_head.py", "grpo_loss_reference",
                                "tests/ops/test_trainable_head.py", "bench/bench_grpo_loss.py"),
}
KERNELS = {"fused_linear_logp": "logp_rows", "fused_linear_logp_backward": "logp_rows",
           "fused_linear_token_loss": "logp_rows"}
# The NF4 family: one kernel file pair (csrc/kernels/nf4*), one registration list (csrc/torch/nf4.h), the op
# (nf4_code is a constant, no device kernel) -> (Python face, reference, tests, benchmark)
NF4_OPS = {op: ("python/fusedrl/ops/nf4.py", ref, "tests/ops/test_nf4.py", "bench/bench_nf4.py")
           for op, ref in (("nf4_quantize", "nf4_quantize_reference"), ("blockwise8_quantize", "nf4_quantize_reference"),
                           ("nf4_dequantize", "nf4_dequantize_reference"),
                           ("nf4_lora_linear", "nf4_lora_linear_reference"),
                           ("nf4_lora_linear_backward", "nf4_lora_linear_reference"))}


# The decode-step ops of the static rollout loop: one kernel file pair (csrc/kernels/decode_attention*), one
# registration list (csrc/torch/decode_attention.h); inference only (no autograd). op -> (face, reference, tests, bench)
DECODE_OPS = {op: ("python/fusedrl/ops/decode_attention.py", ref, "tests/ops/test_decode_attention.py",
                   "bench/bench_rollout.py")
              for op, ref in (("rotary_cache_write", "rope_reference"),
                              ("decode_attention", "decode_attention_reference"),
                              ("rms_norm", "rms_norm_reference"))}


# The activation-offload copies: side-effecting ops on an opaque arena object, used eagerly by fusedrl.nn.offload
# (no fakes, no float64 reference: they move bytes, tested bit for bit). op -> registration keys
OFFLOAD_OPS = {"offload_to_host": ("CPU",), "prefetch_to_device": ("CompositeImplicitAutograd",),
               "fetch_to_device": ("CompositeImplicitAutograd",), "release_offloaded": ("CompositeImplicitAutograd",)}


def registered_ops() -> set[str]:
    """The ops the loaded library registered (torch's dispatcher, not the source text)."""
    _ext.load()
    names = {name.removeprefix("fusedrl::") for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fusedrl::")}
    return names - {"build_info"}


def test_every_registered_op_is_listed_here():
    assert registered_ops() == set(OPS) | set(OFFLOAD_OPS) | set(NF4_OPS) | set(DECODE_OPS) | {"nf4_code"}


def test_offload_ops_have_kernels_registrations_face_tests_and_benchmark():
    assert (ROOT / "csrc/kernels/offload_arena_cpu.cpp").exists() and (ROOT / "csrc/kernels/offload_arena.cu").exists()
    _ext.load()
    for op, keys in OFFLOAD_OPS.items():
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", key), (op, key)
        assert f"torch.ops.fusedrl.{op}(" in (ROOT / "python/fusedrl/ops/offload.py").read_text()
    assert (ROOT / "tests/nn/test_offload.py").exists() and (ROOT / "bench/bench_step.py").exists()


def test_every_op_has_cpu_and_cuda_kernels_and_registrations():
    cuda_built = _ext.build_info().get("cuda", "none") != "none"
    for op, kernel in KERNELS.items():
        assert (ROOT / f"csrc/kernels/{kernel}_cpu.cpp").exists() and (ROOT / f"csrc/kernels/{kernel}.cu").exists()
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", "CPU"), op
        if cuda_built:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", "CUDA"), op


def test_every_op_has_fake_face_reference_tests_and_benchmark():
    from torch._library import simple_registry

    from fusedrl.ops import reference

    for op, (face, ref, tests, bench) in OPS.items():
        assert simple_registry.singleton.find(f"fusedrl::{op}").fake_impl.kernel is not None, f"{op}: no fake"
        assert (ROOT / face).exists()
        assert callable(getattr(reference, ref))
        assert (ROOT / tests).exists()
        assert (ROOT / bench).exists(), f"{op}: missing benchmark {bench}"


def test_every_nf4_op_has_kernels_registrations_fake_reference_tests_and_benchmark():
    from fusedrl.ops import reference

    assert (ROOT / "csrc/kernels/nf4_cpu.cpp").exists() and (ROOT / "csrc/kernels/nf4.cu").exists()
    header = (ROOT / "csrc/torch/nf4.h").read_text()
    assert "register_nf4_ops<CpuNf4Backend>(m)" in (ROOT / "csrc/torch/nf4.cpp").read_text()
    assert "register_nf4_ops<CudaNf4Backend>(m)" in (ROOT / "csrc/torch/nf4_cuda.cpp").read_text()
    _ext.load()
    for op, (face, ref, tests, bench) in NF4_OPS.items():
        assert f'm.impl("{op}"' in header
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", "CPU")
        assert f'register_fake("fusedrl::{op}")' in (ROOT / face).read_text()
        assert callable(getattr(reference, ref))
        assert (ROOT / tests).exists() and (ROOT / bench).exists()


def test_every_decode_op_has_kernels_registrations_fake_reference_tests_and_benchmark():
    from fusedrl.ops import reference

    assert (ROOT / "csrc/kernels/decode_attention_cpu.cpp").exists()
    assert (ROOT / "csrc/kernels/decode_attention.cu").exists()
    header = (ROOT / "csrc/torch/decode_attention.h").read_text()
    assert "register_decode_attention_ops<CpuAttentionBackend>(m)" in (ROOT / "csrc/torch/decode_attention.cpp").read_text()
    assert "register_decode_attention_ops<CudaAttentionBackend>(m)" in (
        ROOT / "csrc/torch/decode_attention_cuda.cpp").read_text()
    cuda_built = _ext.build_info().get("cuda", "none") != "none"
    for op, (face, ref, tests, bench) in DECODE_OPS.items():
        assert f'm.impl("{op}"' in header
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", "CPU")
        if cuda_built:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl::{op}", "CUDA"), op
        assert f'register_fake("fusedrl::{op}")' in (ROOT / face).read_text()
        assert callable(getattr(reference, ref))
        assert (ROOT / tests).exists() and (ROOT / bench).exists()
