"""batchnorm: batch normalization done right and fast.

``batchnorm.reference`` holds the math (array API: NumPy, PyTorch, CuPy, JAX); ``batchnorm.torch``
the PyTorch modules; ``batchnorm.testing`` the conformance suite. Importing this package imports
no torch, numba or triton.
"""

from .reference import (
    Grads,
    RunningStats,
    Saved,
    backward,
    backward_elemt,
    backward_infer,
    backward_reduce,
    batch_norm_infer,
    batch_norm_train,
    batch_stats,
    fold,
    jacobian,
    merge_stats,
    staged_backward,
    update_running_stats,
)

__version__ = "0.1.0"

__all__ = [
    "Grads",
    "RunningStats",
    "Saved",
    "__version__",
    "backward",
    "backward_elemt",
    "backward_infer",
    "backward_reduce",
    "batch_norm_infer",
    "batch_norm_train",
    "batch_stats",
    "fold",
    "jacobian",
    "merge_stats",
    "staged_backward",
    "update_running_stats",
]
