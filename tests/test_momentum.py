"""momentum.py: quasi-global momentum (the recurrence, its checkpoints, what it accepts) and
pc-asgd-av's shared momentum."""

import pytest
import torch

from pcasgd_mpi import rule
from pcasgd_mpi.choices import Balance, Slope
from pcasgd_mpi.flat import FlatParameters
from pcasgd_mpi.momentum import QuasiGlobalMomentum, SharedMomentum, check, has_momentum, why_not_shared


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


# ---------------------------------------------------------------- pc-asgd-av's shared momentum


def _sgd_with_buffer(**kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **kw)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, opt


def test_shared_momentum_writes_the_convex_mix_into_the_buffers_and_refuses_a_non_finite_one():
    model, opt = _sgd_with_buffer(momentum=0.9)
    params = list(model.parameters())
    m = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params]).clone()
    n = m.numel()
    other = torch.arange(n, dtype=m.dtype)
    shared = SharedMomentum(opt, params)
    assert shared.mix([rule.Neighbour(0.25, torch.zeros(n), other, 2)], tolerance=0, horizon=16)
    got = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params])
    torch.testing.assert_close(got, 0.75 * m + 0.25 * other)
    bad = torch.full((n,), float("nan"))
    assert not shared.mix([rule.Neighbour(0.25, torch.zeros(n), bad, 0)], tolerance=0, horizon=16)
    torch.testing.assert_close(torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params]), got)


def test_shared_momentum_before_the_first_step_leaves_the_buffers_alone():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = sum(p.numel() for p in model.parameters())
    assert SharedMomentum(opt, list(model.parameters())).mix(
        [rule.Neighbour(0.5, torch.zeros(n), torch.ones(n), 0)], tolerance=0, horizon=16
    )
    assert all("momentum_buffer" not in opt.state.get(p, {}) for p in model.parameters())


@pytest.mark.parametrize(
    "make, slope, balance, reason",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), Slope.UPDATE, Balance.NONE, None),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4), Slope.UPDATE, Balance.MIX, None),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), Slope.UPDATE, Balance.NONE, "Adam is not torch.optim.SGD"),
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
            Slope.UPDATE,
            Balance.NONE,
            "Nesterov",
        ),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), Slope.OWN, Balance.NONE, "--slope own sends"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), Slope.UPDATE, Balance.LR, "--balance lr"),
    ],
)
def test_why_not_shared_names_what_keeps_the_update_from_being_the_buffer(make, slope, balance, reason):
    got = why_not_shared(make(_model().parameters()), slope, balance)
    assert got is None if reason is None else reason in got


def test_has_momentum():
    assert has_momentum(torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9))
    assert not has_momentum(torch.optim.SGD(_model().parameters(), lr=0.1))
