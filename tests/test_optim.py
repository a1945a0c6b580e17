"""Local optimizers match torch.optim step for step (they exist only to skip its import cost)."""

from __future__ import annotations

import pytest
import torch

from medfed.common.optim import SGD, Adam


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize(
    "ours, ref",
    [
        (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
        (lambda p: Adam(p, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        (lambda p: Adam(p, lr=3e-3, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1)),
    ],
)
def test_same_trajectory_as_torch_optim(ours, ref):
    a, b = _model(), _model()
    opt_a, opt_b = ours(a.parameters()), ref(b.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_left_alone_and_bad_args_raise():
    m = _model()
    m[0].weight.requires_grad_(False)
    before = m[0].weight.clone()
    opt = Adam(m.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(m(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert torch.equal(m[0].weight, before)
    with pytest.raises(ValueError, match="lr"):
        SGD(m.parameters(), lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(m.parameters(), lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="no trainable"):
        Adam([p.requires_grad_(False) for p in _model().parameters()])
