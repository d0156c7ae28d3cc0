"""Small models for the inference server's tests and load scenarios.

``DemoNet`` stands in for the seed's policy/value net: a residual MLP whose forward takes a
few milliseconds on one CPU thread and is dominated by reading its weights, so a batch of 4
costs little more than a batch of 1 (which is what makes dynamic batching pay).
``repeat`` runs the body several times per forward: a slow model for fault tests
(a server killed mid-batch) without any sleep.
"""

from __future__ import annotations

import torch
from torch import nn


class DemoNet(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 1024, depth: int = 4, out_features: int = 16, repeat: int = 1):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.repeat = int(repeat)
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, out_features)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (the server checks requests against it)."""
        return (self.in_features,)

    input_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for _ in range(self.repeat):
            h = torch.relu(self.inp(x))
            for blk in self.blocks:
                h = h + torch.relu(blk(h))
            y = self.out(h)
        return y


class EchoNet(nn.Module):
    """Returns ``x * scale`` for any shape: lets tests tell whose answer came back."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class StuckNet(nn.Module):
    """Never finishes building (waits on an event nobody sets): a server that hangs while
    starting, for start-timeout tests."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        threading.Event().wait()


class CrashNet(nn.Module):
    """Kills its process while building: a server that dies while starting."""

    def __init__(self, exit_code: int = 3) -> None:
        super().__init__()
        import os

        os._exit(int(exit_code))


class OutputKindNet(nn.Module):
    """Answers with the kind of output its first input value names: 0 ``x * 2``; 1 ``x * 2`` as
    a sparse tensor; 2 ``-x`` as a lazy negation (``torch._neg_view``, the negative bit set);
    3 a dict, not a tensor; 4 a tensor on the meta device; 5 ``x`` with a row less. For tests of
    answers the wire cannot carry, or carries only once their values are made real."""

    def forward(self, x: torch.Tensor):
        kind = int(x.reshape(-1)[0].item()) if x.numel() else 0
        if kind == 1:
            return (x * 2).to_sparse()
        if kind == 2:
            return torch._neg_view(x.clone())
        if kind == 3:
            return {"not": "a tensor"}
        if kind == 4:
            return torch.empty(x.shape, device="meta")
        if kind == 5:
            return x[1:]
        return x * 2
