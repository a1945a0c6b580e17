"""SGD (momentum) and Adam for local training, without ``torch.optim``.

Why not ``torch.optim``: in torch 2.13 creating any ``torch.optim`` optimizer imports
``torch._dynamo`` (measured here: 2.9 s). In deployment Flower starts a fresh ClientApp
process for every message, so that import would be paid on every training round at every
site. These two classes implement exactly the update rules of ``torch.optim.SGD`` and
``torch.optim.Adam`` with their default options (no Nesterov, no AMSGrad, L2 weight decay
added to the gradient); ``tests/test_optim.py`` checks them step for step against
``torch.optim``. DP-SGD (Opacus) wraps a ``torch.optim`` optimizer instead and pays the
import there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _LocalOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: unfreeze at least one layer")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        self.lr = lr
        self.weight_decay = weight_decay

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        if p.grad is None:
            return None
        return p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad


class SGD(_LocalOptimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` (dampening 0, no Nesterov)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} must be in [0, 1)")
        self.momentum = momentum
        self._buf: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = self._grad(p)
            if g is None:
                continue
            if self.momentum:
                buf = self._buf[i]
                if buf is None:
                    buf = self._buf[i] = g.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


class Adam(_LocalOptimizer):
    """``torch.optim.Adam(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)``."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]
        self._t = [0] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = self._grad(p)
            if g is None:
                continue
            self._t[i] += 1
            t = self._t[i]
            m, v = self._m[i], self._v[i]
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g.conj(), value=1 - self.beta2)
            bias1 = 1 - self.beta1**t
            bias2_sqrt = (1 - self.beta2**t) ** 0.5
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bias1)
