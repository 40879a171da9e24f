"""Counting checks that can fail: matrix products shaped like a weight (a dense weight gradient)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)


class WeightShapedProducts(TorchDispatchMode):
    """Records every matrix product whose result has the shape of one of ``shapes``.

    A dense gradient of a weight ``(out, in)`` is such a product (``dY^T X``); choose a token
    count that matches no weight dimension, so that nothing else can be.
    """

    def __init__(self, shapes: set[tuple[int, int]]) -> None:
        super().__init__()
        self.shapes = shapes
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in PRODUCTS and tuple(out.shape[-2:]) in self.shapes:
            self.seen.append((str(func), tuple(out.shape)))
        return out
