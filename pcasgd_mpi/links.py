"""--theta-rule link: per link, what this rank pulled over the link's delay (ALGORITHM.md, "Link
prediction"). Pure tensor code, no MPI.

Link (j, l) with delay D uses the late pair (x^l_{k−D}, x^j_{k−D}) at both ends. This rank keeps its
own weights of the last D_max + 1 steps (its half of the pair), and per link its pulls of the last
D steps and their sum C. A step's pulls are computed by `pull` and kept by `commit` once the step's
result is accepted, so that a step made again (a neighbour's message left out) does not count twice.
"""

from __future__ import annotations

import torch

from . import rule


class _Ring:
    """Vectors by step, the last `depth` of them."""

    def __init__(self, depth: int, numel: int, dtype: torch.dtype, device: torch.device):
        self.steps = [-1] * depth
        self.data = torch.zeros(depth, numel, dtype=dtype, device=device)

    def put(self, step: int, x: torch.Tensor) -> None:
        slot = step % len(self.steps)
        self.steps[slot] = step
        self.data[slot].copy_(x)

    def get(self, step: int) -> torch.Tensor | None:
        slot = step % len(self.steps)
        return self.data[slot] if step >= 0 and self.steps[slot] == step else None

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "data": self.data.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.data.copy_(state["data"])


class LinkPulls:
    def __init__(
        self,
        links: dict[int, tuple[float, int]],
        gain: float,
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        """``links``: neighbour -> (W_jl, D of the link); ``gain``: γ (rule.link_gain)."""
        self.links, self.gain = dict(links), float(gain)
        depth = max((d for _, d in self.links.values()), default=0) + 1
        self.own = _Ring(depth, numel, dtype, device)
        # the pulls of steps k − D … k − 1 (depth D + 1: the one leaving is read after the new one is put)
        self.pulls = {n: _Ring(d + 1, numel, dtype, device) for n, (_, d) in self.links.items() if d > 0}
        self.pulled = {n: torch.zeros(numel, dtype=dtype, device=device) for n in self.links}  # 0 when D = 0
        self._now = {n: torch.zeros(numel, dtype=dtype, device=device) for n in self.links}
        self._step: int | None = None

    def pull(self, k: int, x_k: torch.Tensor, late: dict[int, torch.Tensor | None], out: torch.Tensor) -> list[int]:
        """Writes Σ_l a^{jl}_k into ``out``; ``late[l]`` is x^l_{k−D} (None: not held, no pull).
        Returns the neighbours pulled."""
        self.own.put(k, x_k)
        self._step, pulled_from = k, []
        out.zero_()
        for n, (weight, delay) in self.links.items():
            x_l, x_j = late.get(n), self.own.get(k - delay)
            if x_l is None or x_j is None:
                self._now[n].zero_()
                continue
            rule.link_pull(x_l, x_j, self.pulled[n], self.gain, weight, out=self._now[n])
            out.add_(self._now[n])
            pulled_from.append(n)
        return pulled_from

    def commit(self) -> None:
        """Keeps the pulls of the step last computed: C ← C + a_k − a_{k−D}."""
        k = self._step
        if k is None:
            return
        for n, ring in self.pulls.items():
            delay = self.links[n][1]
            ring.put(k, self._now[n])  # zero when the link did not pull
            self.pulled[n].add_(self._now[n])
            leaving = ring.get(k - delay)
            if leaving is not None:
                self.pulled[n].sub_(leaving)
        self._step = None

    def state_dict(self) -> dict:
        return {
            "gain": self.gain,
            "own": self.own.state_dict(),
            "pulls": {str(n): r.state_dict() for n, r in self.pulls.items()},
            "pulled": {str(n): c.clone() for n, c in self.pulled.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.own.load_state_dict(state["own"])
        for n, ring in self.pulls.items():
            ring.load_state_dict(state["pulls"][str(n)])
        for n, c in self.pulled.items():
            c.copy_(state["pulled"].get(str(n), torch.zeros_like(c)))
