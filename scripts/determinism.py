"""Determinism of the fit across torch thread counts (issue 9).

Fits the same guard (same model, data, seed, settings) with 1 and with 2 torch threads (``torch.set_num_threads``) on a small
MNIST setup (the embedded 12,000-image subset, 10 % of its training split = 1,200 clean validation
images, a BadNets model trained for 1 epoch) and writes ``results/determinism.json``: per fitted
tensor (masks, fills, thresholds, consistency profile) the max abs difference between the two fits
and whether they are bit-identical, and whether the labels / verdicts of 1,000 test inputs agree
(each guard answering with the thread count it was fitted with, as on two machines).
Same-thread-count bit-identity is tested in ``tests/test_robustness.py`` (``--repeat`` also refits
with 1 thread here).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/determinism.py [--repeat] [--out results/determinism.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402


def state(g):
    out = {"thresholds": g.thresholds}
    for name in ("masks", "fills", "profile"):
        out.update({f"{name}.{k}": v for k, v in getattr(g, name).items()})
    return {k: v.detach().cpu() for k, v in out.items()}


def compare(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    rows = {}
    for k in sorted(sa):
        x, y = sa[k], sb[k]
        if x.shape != y.shape:
            rows[k] = {"shape": [list(x.shape), list(y.shape)], "identical": False}
            continue
        finite = torch.isfinite(x) & torch.isfinite(y)
        diff = (x[finite].double() - y[finite].double()).abs()
        rows[k] = {"shape": list(x.shape), "identical": bool(torch.equal(x, y)),
                   "max_abs_diff": diff.max().item() if diff.numel() else 0.0,
                   "elements_differing": int((x != y).sum()),
                   "nonfinite_agree": bool(torch.equal(~torch.isfinite(x), ~torch.isfinite(y)))}
    return rows


def fit_with(threads, model, d, seed, overrides):
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    t0 = time.perf_counter()
    g = LinkBreaker.fit(model, d["x_val"], d["y_val"], 10, progress=False, seed=seed, **overrides)
    return g, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/determinism.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--neighbours", type=int, default=1,
                   help="Alg. 1 neighbours per sample (default 1, not the GuardConfig default 4, so the "
                        "run stays under 3 minutes on a loaded 2-core machine)")
    p.add_argument("--repeat", action="store_true", help="also refit with 1 thread (bit-identity check)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    overrides = {"neighbours": args.neighbours}
    torch.set_num_threads(1)
    d = experiment.split_data("mnist", "embedded", 0.1, args.seed)
    attack = experiment.make_attack("badnets", target=0, seed=args.seed)
    t0 = time.perf_counter()
    model = experiment.train_model("mnist", attack, d["x_train"], d["y_train"], epochs=1,
                                   seed=args.seed, progress=False)
    train_s = time.perf_counter() - t0
    x = d["x_test"][: args.n_test]

    g1, fit1_s = fit_with(1, model, d, args.seed, overrides)
    r1 = g1(x)
    g2, fit2_s = fit_with(2, model, d, args.seed, overrides)
    r2 = g2(x)
    torch.set_num_threads(1)
    r2_on_1 = g2(x)  # the 2-thread guard answering with 1 thread: isolates the fit's differences
    tensors = compare(g1, g2)
    report = {
        "setup": {"data": "embedded MNIST subset, split_data('mnist', 'embedded', 0.1, seed)",
                  "model": "MnistNet, BadNets (target 0), 1 epoch", "seed": args.seed,
                  "validation_images": len(d["y_val"]), "test_inputs": len(x),
                  "guard": f"GuardConfig defaults, overrides {overrides}", "torch": torch.__version__,
                  "machine": platform.machine(), "processor": platform.processor(),
                  "threads_compared": [1, 2]},
        "tensors": tensors,
        "all_identical": all(r["identical"] for r in tensors.values()),
        "max_abs_diff": max(r.get("max_abs_diff", float("inf")) for r in tensors.values()),
        "labels": {
            "agree": bool(torch.equal(r1.labels, r2.labels)),
            "disagreeing": int((r1.labels != r2.labels).sum()),
            "verdicts_agree": bool(torch.equal(r1.verdict, r2.verdict)),
            "confidences_max_abs_diff": (r1.confidences - r2.confidences).abs().max().item(),
            "two_thread_guard_with_one_thread_agree": bool(torch.equal(r1.labels, r2_on_1.labels)),
            "two_thread_guard_with_one_thread_confidences_max_abs_diff":
                (r1.confidences - r2_on_1.confidences).abs().max().item(),
        },
        "timing_s": {"train": train_s, "fit_1_thread": fit1_s, "fit_2_threads": fit2_s},
    }
    if args.repeat:
        g1b, _ = fit_with(1, model, d, args.seed, overrides)
        same = compare(g1, g1b)
        report["repeat_1_thread"] = {"all_identical": all(r["identical"] for r in same.values()),
                                     "max_abs_diff": max(r.get("max_abs_diff", float("inf"))
                                                         for r in same.values())}
    report["timing_s"]["total"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("all_identical", "max_abs_diff", "labels", "timing_s")},
                     indent=2))
    if "repeat_1_thread" in report:
        print("repeat with 1 thread:", report["repeat_1_thread"])


if __name__ == "__main__":
    main()
