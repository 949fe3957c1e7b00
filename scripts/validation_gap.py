"""Dev check (issue #6): does a data set's validation draw look like its test split to the model?
GTSRB's training split is tracks of ~30 frames of one physical sign, so a stratified draw from it
repeats signs the model trained on. Prints and writes the model's accuracy and true-class confidence
quantiles on the validation set, on the dev half of the test split and on the test split's unread
tail (``experiment.TEST_TAIL``, where there is one).

    python scripts/validation_gap.py --dataset gtsrb --run none-0
    # writes results/dev/<dataset>/validation-gap-<run>.json
    python scripts/validation_gap.py --dataset cifar10 --run none-0 --work runs/cifar10-e40 --tag e40
    # another training recipe's model (its own work folder): validation-gap-<run>-<tag>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, training  # noqa: E402


def summary(model, x, y):
    p = training.predict_logits(model, x).softmax(1)
    conf = p[torch.arange(len(y)), y]
    q = torch.tensor([0.01, 0.05, 0.1, 0.5])
    return {"n": len(y), "accuracy": (p.argmax(1) == y).float().mean().item(),
            "true_class_confidence_quantiles": dict(zip(q.tolist(), conf.quantile(q).tolist()))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--run", default="none-0", help="<attack>-<seed> under runs/<dataset>/models/")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--work", default=None, help="models folder's parent (default: runs/<dataset>)")
    p.add_argument("--tag", default=None, help="suffix of the JSON's name (another recipe's model)")
    args = p.parse_args()
    torch.set_num_threads(1)
    seed = int(args.run.rsplit("-", 1)[1])
    split = experiment.split_data(args.dataset, args.data, None, seed)
    work = Path(args.work) if args.work else ROOT / "runs" / args.dataset
    model, meta = experiment.load_model(work / "models" / f"{args.run}.safetensors")
    model.eval()
    out = {"dataset": args.dataset, "run": args.run, "work": str(args.work or f"runs/{args.dataset}"),
           "arch": experiment.model_arch(meta),
           "validation": summary(model, split["x_val"], split["y_val"]),
           "test_dev": summary(model, split["x_test"][:5000], split["y_test"][:5000])}
    start = experiment.TEST_TAIL.get(args.dataset)
    if start is not None and len(split["y_test"]) > start:
        out["test_tail"] = summary(model, split["x_test"][start:], split["y_test"][start:])
    for k in ("validation", "test_dev", "test_tail"):
        if k in out:
            print(f"{k}: n={out[k]['n']} accuracy {100 * out[k]['accuracy']:.2f} %")
    name = f"validation-gap-{args.run}{'-' + args.tag if args.tag else ''}.json"
    path = ROOT / "results" / "dev" / args.dataset / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
