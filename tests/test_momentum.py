"""Quasi-global momentum (momentum.py): the recurrence, its checkpoints, and what it accepts."""

import pytest
import torch

from pcasgd_mpi.flat import FlatParameters
from pcasgd_mpi.momentum import QuasiGlobalMomentum, check


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _steps(model, opt, qgm, grads, pulls):
    """Steps with given gradients; after each, a 'mix' moves the weights by the given pull."""
    if not hasattr(model, "_flat"):
        model._flat = FlatParameters(model)
    flat = model._flat
    for g, pull in zip(grads, pulls):
        x_k = flat.data.clone()
        offset = 0
        for p in model.parameters():
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        qgm.before_step()
        opt.step()
        flat.data.add_(pull)
        qgm.after_step(x_k, flat.data)
    return flat.data.clone()


def test_the_step_uses_the_momentum_of_the_whole_movement():
    torch.manual_seed(3)
    lr, beta, n = 0.1, 0.9, 8
    grads = [torch.randn(n) for _ in range(5)]
    pulls = [torch.randn(n) * 0.01 for _ in range(5)]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    got = _steps(model, opt, QuasiGlobalMomentum(opt, list(model.parameters())), grads, pulls)
    m = torch.zeros(n)
    for g, pull in zip(grads, pulls):  # d = β m + g; x ← x − α d + pull; m ← β m + (1 − β)(x_old − x)/α
        new = x - lr * (beta * m + g) + pull
        m = beta * m + (1 - beta) * (x - new) / lr
        x = new
    torch.testing.assert_close(got, x)


def test_a_checkpoint_of_the_wrapped_optimizer_carries_it_on():
    torch.manual_seed(4)
    grads = [torch.randn(8) for _ in range(6)]
    pulls = [torch.randn(8) * 0.01 for _ in range(6)]
    whole = _model()
    opt = torch.optim.SGD(whole.parameters(), lr=0.05, momentum=0.9)
    expected = _steps(whole, opt, QuasiGlobalMomentum(opt, list(whole.parameters())), grads, pulls)

    first = _model()
    opt1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    _steps(first, opt1, QuasiGlobalMomentum(opt1, list(first.parameters())), grads[:3], pulls[:3])
    resumed = _model(seed=9)
    resumed._flat = FlatParameters(resumed)
    resumed._flat.data.copy_(first._flat.data)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt1.state_dict())
    got = _steps(resumed, opt2, QuasiGlobalMomentum(opt2, list(resumed.parameters())), grads[3:], pulls[3:])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda ps: torch.optim.Adam(ps), "works on torch.optim.SGD, not Adam"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "needs a momentum > 0"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), "without Nesterov"),
    ],
)
def test_it_refuses_what_it_cannot_replace(make, words):
    with pytest.raises(ValueError, match=words):
        check(make(_model().parameters()))
