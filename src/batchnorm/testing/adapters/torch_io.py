"""What the PyTorch styles (module, functional, backend) share: the case's arrays as tensors
on the device, channel axis at 1, and their results back as float64 arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, as_float64, vector


class TorchIO:
    """Tensors in the case's dtype on ``device``; the channel axis is moved to 1 by a view."""

    def __init__(self, case: Case, device: str) -> None:
        import torch

        self.torch, self.case, self.device = torch, case, device
        self.dtype = getattr(torch, case.dtype)

    def tensor(self, arr: np.ndarray, requires_grad: bool = False) -> Any:
        t = self.torch.tensor(arr, dtype=self.dtype, device=self.device)
        return t.requires_grad_(requires_grad)

    def channels_first(self, t: Any) -> Any:
        return t.movedim(self.case.channel_axis, 1)

    def output(self, stage: str, name: str, value: Any) -> np.ndarray:
        if not isinstance(value, self.torch.Tensor):
            raise ImplementationError(
                f"{stage} returned a {type(value).__name__}, expected a tensor ({name})"
            )
        if value.dtype != self.dtype:
            raise ImplementationError(
                f"{stage}: {name} has dtype {value.dtype}, expected {self.dtype} (the input's)"
            )
        expected = tuple(self.channels_first(self.torch.empty(self.case.shape)).shape)
        if tuple(value.shape) != expected:
            raise ImplementationError(
                f"{stage}: {name} has shape {tuple(value.shape)}, expected {expected}"
            )
        return as_float64(stage, name, value.movedim(1, self.case.channel_axis))

    def mask_kwargs(self, data: CaseData) -> dict[str, Any]:
        """``{"mask": (N, L) bool tensor}`` for a masked case, else ``{}``."""
        if data.mask is None:
            return {}
        return {"mask": self.torch.tensor(data.mask, dtype=self.torch.bool, device=self.device)}

    def vector(self, stage: str, name: str, value: Any) -> np.ndarray:
        if value is None:
            raise ImplementationError(f"{stage}: {name} is None (no gradient reached it)")
        return vector(stage, name, value, self.case.channels)
