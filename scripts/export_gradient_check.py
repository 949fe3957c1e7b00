"""Can ``torch.export`` carry a guard that takes input gradients online (the pushed copy, docs/method.md)?

    python scripts/export_gradient_check.py

A small conv net whose ``forward`` takes three signed-gradient steps up its own answer's log-odds,
written with ``torch.autograd.grad`` and with ``torch.func.grad``, tried with non-strict and strict
export and with ``torch.compile``. Writes ``results/dev/faint-trigger/export-gradient.json``: for each
way, ``ok`` or the error's type and first line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "results" / "dev" / "faint-trigger" / "export-gradient.json"


def log_odds_of(net, xs, y):
    own = F.log_softmax(net(xs), 1).gather(1, y[:, None]).squeeze(1)
    return (own - torch.log1p(-own.exp().clamp(max=1 - 1e-6))).sum()


class Pushed(nn.Module):
    def __init__(self, net, functional: bool):
        super().__init__()
        self.net, self.functional = net, functional

    def forward(self, x):
        y = self.net(x).argmax(1)
        with torch.enable_grad():
            for _ in range(3):
                if self.functional:
                    g = torch.func.grad(lambda xs: log_odds_of(self.net, xs, y))(x)
                else:
                    xs = x.detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(log_odds_of(self.net, xs, y), xs)
                x = (x + 2 / 255 * g.sign()).clamp(0, 1)
        return self.net(x)


def attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as e:  # the point is which error, if any
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"


def main():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    net.requires_grad_(False)
    x = torch.rand(4, 1, 28, 28)
    out = {"torch": torch.__version__}
    for name, functional in (("autograd.grad", False), ("func.grad", True)):
        m = Pushed(net, functional)
        out[name] = {"export non-strict": attempt(lambda: torch.export.export(m, (x,), strict=False)),
                     "export strict": attempt(lambda: torch.export.export(m, (x,), strict=True)),
                     "compile": attempt(lambda: torch.testing.assert_close(torch.compile(m)(x), m(x)))}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
