"""Triton GPU backend: the batch-norm stages as Triton kernels, behind :class:`TritonBackend`.

Layouts: a tensor is run in place when it is dense with its channel axis either "NCHW-style"
(contiguous, any rank, including (N, C)) or last in memory (``torch.channels_last``,
``channels_last_3d``, or a (N, ..., C) tensor with ``axis=-1``). Other strides are copied to
contiguous first. Outputs have the layout of the input. Gradients and residuals that arrive in
another layout are copied into the input's layout.

Dtypes: float32, float16 and bfloat16 in, float32 arithmetic, float32 ``mean``/``var``/
``invstd``/``sum_dy``/``sum_dy_xhat``, output in the input dtype. float64 is not run here (say
``backend="reference"``, or let ``"auto"`` fall back).

Determinism: the reductions split each channel over a 2-D grid (channel blocks x splits) and merge
the float32 partials in a fixed order without atomics, so a result is bitwise reproducible for a
given shape, layout and device. The split count depends on the device's SM count, so results may
differ in the last bits between different GPUs.

With ``TRITON_INTERPRET=1`` set before triton is first imported, the kernels run on CPU tensors in
Triton's interpreter (slowly): that is how CI tests them without a GPU.

Files: ``kernels`` (the Triton kernels, the math above each), ``runtime`` (triton imported
lazily), ``plan`` (tiles and programs), ``layout`` (views, vectors, the packed ReLU mask),
``launchers`` (a stage as kernel launches), ``backend`` (``TritonBackend``), ``compile_check``
(lower every kernel for a GPU target without a GPU).
"""

from .backend import SUPPORTED_DTYPES, TritonBackend
from .launchers import (
    backward_elemt,
    backward_reduce,
    backward_train,
    batch_stats,
    elemt,
    forward_infer,
    forward_train,
)
from .plan import Plan, make_plan, tuning
from .runtime import is_interpreter, triton_unavailable_reason

__all__ = [
    "Plan",
    "SUPPORTED_DTYPES",
    "TritonBackend",
    "backward_elemt",
    "backward_reduce",
    "backward_train",
    "batch_stats",
    "elemt",
    "forward_infer",
    "forward_train",
    "is_interpreter",
    "make_plan",
    "triton_unavailable_reason",
    "tuning",
]
