"""The math of batch normalization, once, against the array API (NumPy, PyTorch, CuPy, JAX).

JAX arrays: every function runs eagerly and under ``jax.jit`` (nothing is written in place;
what needs values on the host is skipped under jit: a non-finite batch's warning, while its
running statistics are still kept; the check of ``mask=``'s count of real positions), and
``jax.grad`` through ``batch_norm_train`` equals ``backward``.

Stages (every backend implements the same names, ``stages.Backend``): ``batch_stats`` ->
``merge_stats`` -> ``elemt`` forward; ``backward_reduce`` -> (all-reduce) -> ``backward_elemt``
backward. The compositions (``batch_norm_train``, ``backward``, ...) run any backend's stages.
"""

from .backward import Grads, backward_elemt, backward_reduce
from .composite import backward, backward_infer, batch_norm_infer, batch_norm_train, resolve
from .forward import Saved, check_input, elemt, fold, normalize
from .jacobian import jacobian
from .running import CONVENTIONS, RunningStats, check_momentum, update_running_stats
from .staged import Staged, staged_backward
from .stages import (
    REFERENCE,
    Backend,
    BackwardOut,
    Elemt,
    ForwardOut,
    ReferenceStages,
    backward_train,
    compose_backward_train,
    compose_forward_train,
    forward_train,
)
from .stats import BatchStats, batch_stats, inverse_std, merge_stats

__all__ = [
    "REFERENCE",
    "Backend",
    "BackwardOut",
    "Elemt",
    "ForwardOut",
    "ReferenceStages",
    "backward_train",
    "compose_backward_train",
    "compose_forward_train",
    "forward_train",
    "resolve",
    "BatchStats",
    "CONVENTIONS",
    "Grads",
    "RunningStats",
    "Saved",
    "Staged",
    "backward",
    "backward_elemt",
    "backward_infer",
    "backward_reduce",
    "batch_norm_infer",
    "batch_norm_train",
    "batch_stats",
    "check_input",
    "check_momentum",
    "elemt",
    "fold",
    "inverse_std",
    "jacobian",
    "merge_stats",
    "normalize",
    "staged_backward",
    "update_running_stats",
]
