"""Dev probe (issue #6): which source classes a saved guard's escapes come from.

For the **dev** half of the test split (indices 0-4999) and ``--n`` triggered inputs whose true
class is not the target, the triggered inputs the guard answers with the target (hint reading;
accepted separately), counted by their true (source) class beside how many triggered inputs each
class contributed. On GTSRB's Trojan watermark it shows the escapes come from signs that resemble
the target.

    python scripts/escape_sources.py --dataset gtsrb --attack trojan-watermark --seed 0 \
        --work runs/gtsrb-sgdbf16-e30 --n 2000

Writes ``results/dev/<dataset>/escape-sources-<attack>-<seed>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT  # noqa: E402

DEV = slice(0, 5000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--attack", default="trojan-watermark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split, _, attack, guard, _ = experiment.saved_run(args.dataset, f"{args.attack}-{args.seed}",
                                                      args.data, args.work)
    _, _, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], 1, args.n,
                                                args.seed, DEV)
    r = guard(xt)
    escaped = r.labels == target
    accepted = escaped & (r.verdict == ACCEPT)
    triggered = Counter(yt.tolist())
    out = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "split": "dev",
           "work": args.work, "target": int(target), "triggered": len(yt),
           "escaped": int(escaped.sum()), "accepted": int(accepted.sum()),
           "by_source": [{"class": c, "escaped": n, "accepted": int((accepted & (yt == c)).sum()),
                          "triggered": triggered[c]}
                         for c, n in Counter(yt[escaped].tolist()).most_common()],
           "no_escape_largest": [{"class": c, "triggered": n} for c, n in triggered.most_common()
                                 if not (escaped & (yt == c)).any()][:5]}
    path = ROOT / "results" / "dev" / args.dataset / f"escape-sources-{args.attack}-{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"{out['escaped']} of {out['triggered']} triggered inputs answered with class {out['target']} "
          f"({out['accepted']} accepted)")
    for row in out["by_source"]:
        print(f"  class {row['class']:>3}: {row['escaped']} of {row['triggered']}")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
