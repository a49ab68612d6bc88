"""fusedrl: GRPO-family RL training for LLMs with fused CUDA kernels on the hot paths."""

__version__ = "0.1.0"
