"""Dev probe (issue #6, the paper's Fig. 12): does a *strengthened* copy of an input expose a faint trigger?

A Trojan square at 30-50 % transparency fires the backdoor only just, and its neurons stay inside
every bound (docs/results.md, "Trigger transparency"); the full-strength square sits outside
``relu3``'s and ``relu6``'s bounds on 90-100 % of inputs. A dimmed copy (``faint_trigger_screen.py``)
asks whether the answer survives weakening; this asks the converse: push the input a few small
steps up its own answer's log-odds (signed gradient of the plain model) and read the guard's
consistency ratio of the answer's head on that copy. The shortest way up a backdoored answer is
the trigger itself, so a faint trigger should be pushed towards full strength, out of its bounds,
while a clean answer climbs through its class's evidence, inside them. Also screened: a global
contrast boost and an unsharp mask, strengthenings that need no gradient.

The bound is the ``--quantile`` of the same ratio on the validation set (each sample pushed up its
own class, where its head is confident); no test input sets it. Reported on the dev half (test
indices 0-4999): the share of clean inputs the guard answers rightly and accepts that the bound
would refuse, and of triggered inputs accepted as the target, the share it would catch. The saved
guard is used as it is. Writes ``results/dev/faint-trigger/strengthen-<work>-<attack>-<seed>.json``.

    python scripts/faint_trigger_strengthen.py --work runs/cifar10-sgdbf16-e80 --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from faint_trigger_screen import OUT, bounded_row, dev_draw  # noqa: E402


def pushed(model, x, labels, steps: int, eps: float, value_range, chunk: int = 250):
    """``x`` moved ``steps`` signed-gradient steps of ``eps`` up ``labels``' log-odds (plain model)."""
    out = []
    for i in range(0, len(x), chunk):
        xs, ys = x[i:i + chunk].clone(), labels[i:i + chunk]
        for _ in range(steps):
            xs.requires_grad_(True)
            logp = F.log_softmax(model(xs), 1)
            own = logp.gather(1, ys[:, None]).squeeze(1)
            rest = torch.log1p(-own.exp().clamp(max=1 - 1e-6))
            (g,) = torch.autograd.grad((own - rest).sum(), xs)
            xs = (xs.detach() + eps * g.sign()).clamp(*value_range)
        out.append(xs.detach())
    return torch.cat(out)


def contrast(x, alpha, value_range):
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (m + alpha * (x - m)).clamp(*value_range)


def unsharp(x, amount, value_range):
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x + amount * (x - blur)).clamp(*value_range)


def ms_per_input(fn, x) -> float:
    """Wall time of ``fn(x)`` per input, in ms (one thread): what a way would add online."""
    t = time.perf_counter()
    fn(x)
    return round(1000 * (time.perf_counter() - t) / len(x), 3)


def head_ratio(guard, x, heads):
    """The consistency ratio of head ``heads[i]`` on ``x[i]`` and whether that head is confident."""
    r = guard(x)
    i = torch.arange(len(x))
    return r.consistency[i, heads].cpu(), (r.confidences[i, heads] >= r.thresholds[heads]).cpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--attack", default="trojan-square")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--quantile", type=float, default=0.995)
    ap.add_argument("--ways", nargs="+", default=None, help="names' first words to screen (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    draw = dev_draw(work, args.attack, args.seed, args.n_clean, args.n_trigger, args.transparency)
    model, guard = draw.model, draw.guard
    vr = guard.input_range or (0.0, 1.0)
    ways = {f"push {s}x{e * 255:g}/255": (lambda x, y, s=s, e=e: pushed(model, x, y, s, e, vr))
            for s, e in ((1, 2 / 255), (3, 2 / 255), (5, 2 / 255))}
    ways.update({f"contrast {a:g}": (lambda x, y, a=a: contrast(x, a, vr)) for a in (1.25, 1.5)})
    ways.update({f"unsharp {a:g}": (lambda x, y, a=a: unsharp(x, a, vr)) for a in (1.0, 2.0)})
    ways["none"] = lambda x, y: x
    if args.ways:
        ways = {k: v for k, v in ways.items() if k.split()[0] in args.ways}
    probe = draw.xc[:500]  # the online cost: the guard's call, and each way's copy and its reading
    guard_ms = ms_per_input(guard, probe)
    rows = []
    for name, way in ways.items():
        row = {"way": name, **bounded_row(draw, lambda x, h, way=way: head_ratio(guard, way(x, h), h),
                                          args.quantile, digits=2, median_key="triggered_median_ratio"),
               "copy_and_reading_ms_per_input": ms_per_input(
                   lambda x, way=way: head_ratio(guard, way(x, draw.yc[:len(x)]), draw.yc[:len(x)]), probe)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cmd = (f"python scripts/faint_trigger_strengthen.py --work {args.work} --attack {args.attack} "
           f"--seed {args.seed} --transparency {' '.join(f'{t:g}' for t in args.transparency)} "
           f"--n-clean {args.n_clean} --n-trigger {args.n_trigger} --quantile {args.quantile:g}"
           + (f" --ways {' '.join(args.ways)}" if args.ways else ""))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"strengthen-{work.name}-{args.attack}-{args.seed}.json"
    path.write_text(json.dumps({"command": cmd, "target": draw.target, "guard_ms_per_input": guard_ms,
                                "clean_right_accepted": round(100 * draw.right.double().mean().item(), 2),
                                "rows": rows}, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
