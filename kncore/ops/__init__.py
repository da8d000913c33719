"""Raw ops: C++ and Triton kernels, each with its plain PyTorch reference (the lowest API level)."""
from . import mlp_capture  # noqa: F401  fused MLP up-projection + activation + capture (Triton)
from . import ig_steps  # noqa: F401  integrated-gradient steps expanded and reduced in batches (Triton)
from .cov_accumulate import CovAccumulator, cov_accumulate_, cov_accumulate_ref, cov_mirror  # noqa: F401  C += X^T X, lower triangle (C++)
from .rank1_update import Rank1Undo, rank1_undo_, rank1_update_, rank1_update_ref  # noqa: F401  W += a u v^T with bit-exact undo (C++)
