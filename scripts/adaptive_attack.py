"""An adaptive, white-box attacker against the guard (issue #6: "adaptive attacks are untested").

The attacker knows the backdoored model, its trigger and the fitted guard (masks, fills, profile,
thresholds, bounds). At test time it adds a perturbation ``delta`` (``||delta||_inf <= eps``, the
image kept in its value range) to a triggered input, chosen by projected gradient descent (sign
steps) so that the **target head** passes both of Alg. 3's tests: its confidence in the target
reaches its threshold and, in every evidence (masked layer views and the late layer), its
deviation from the target class's clean profile stays under the bound (hinge losses with a small
margin, in log space). The gradient flows through head k's own masked forward
(:func:`target_head_terms`), which reproduces the guard's numbers for that head (checked at
``delta = 0`` before every run). The result is then judged by the real guard (all N heads, the
one-label rule): ASR counts a triggered input answered with the target (hint reading, as the
held-out tables) and, separately, accepted as the target.

Against a guard with the neighbour stability test, the attacker also knows the guard's saved noise
pattern and bound, and adds a third hinge: head k's log-odds (capped as the guard caps them) may fall
from ``x + delta`` to its neighbours (``x + delta`` plus each pattern, scaled to its contrast as the
guard scales it, differentiably) by at most the bound.

Two controls per budget: ``eps = 0`` (today's non-adaptive numbers on these inputs) and the same
attack on **clean** inputs of other classes (no trigger): at a budget where the attack also turns
clean inputs into accepted targets, it is an adversarial-example attack on the guard, not a way
round the backdoor check.

Inputs: the held-out half of the test split (indices 5000-9999), ``--n`` triggered inputs whose
true class is not the target and ``--n`` clean ones, drawn as ``experiment.eval_sets`` draws them.

    python scripts/adaptive_attack.py --dataset cifar10 --attacks badnets blended wanet
    python scripts/adaptive_attack.py --dataset cifar10 --attacks wanet-noise --guard-tag jitter
    python scripts/adaptive_attack.py --table          # results/adaptive/adaptive.md

Writes ``results/adaptive/<dataset>-<attack>-0[-<tag>].json``. ``--guard-tag`` attacks a variant guard
that ``linkbreaker reproduce --tag`` saved beside the default (``<attack>-0-<tag>.safetensors``), e.g. the
stability test's geometric neighbours (``--tag jitter --set stability_noise=0.0 --set
stability_jitter=0.5``): the attacker differentiates through the guard's own resampling grids.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, metrics, salient  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
from linkbreaker_ext.reproduce import config_record  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT, STABILITY_EPS  # noqa: E402
from linkbreaker_ext.layers import LATE, expand_mask, unit_views  # noqa: E402

HELDOUT = slice(5000, 10000)
OUT = ROOT / "results" / "adaptive"
MARGIN = 0.05  # hinge margin in log space: aim a little inside every test


def target_head_terms(guard: LinkBreaker, x: torch.Tensor, k: int):
    """``(log_odds [B], log_ratio [B, L])`` of head ``k`` on inputs ``x``, differentiable in ``x``:
    the log-odds of its confidence in class ``k`` (against the threshold's log-odds) and the log of
    each evidence's deviation over its bound (consistent when every entry is <= 0), exactly as the
    guard computes them for that head (its own masking at every masked layer, then the late
    layer's mask and fill and the final Linear)."""
    seen = {}
    stat = guard.config.consistency_units

    def on_layer(name, a):
        m = expand_mask(guard.masks[name][k:k + 1].to(a.dtype), a.shape, name)[0]
        out = m * a + (1 - m) * guard.fills[name].to(a.dtype).reshape(a.shape[1:])
        seen.update(unit_views(out, name, stat))
        return out

    late = guard.tapped._run(x, on_layer).flatten(1).float()
    ml = guard.masks[LATE][k]
    head = guard.tapped.late
    z = (ml * late + (1 - ml) * guard.fills[LATE]) @ head.weight.t()
    if head.bias is not None:
        z = z + head.bias
    logp = torch.log_softmax(z, 1)
    others = torch.cat([logp[:, :k], logp[:, k + 1:]], 1).logsumexp(1)
    log_odds = logp[:, k] - others
    seen[LATE] = late
    p = guard.profile
    ratios = []
    for i, name in enumerate(guard._profile_layers()):
        d = salient.deviation(seen[name], p[f"center.{name}"][k:k + 1], p[f"scale.{name}"][k:k + 1],
                              p[f"weight.{name}"][k:k + 1])[:, 0]
        ratios.append(d / (p["norms"][k, i] * p["bounds"][k]))
    return log_odds, torch.stack(ratios, 1).clamp_min(1e-12).log()


def check_surrogate(guard, x, k):
    """The attack's differentiable head ``k`` against the guard's own numbers (no perturbation)."""
    with torch.no_grad():
        log_odds, log_ratio = target_head_terms(guard, x, k)
        conf, dev = guard._heads_with_deviations(x, by_layer=False)
    mine_conf = torch.sigmoid(log_odds)
    mine_dev = log_ratio.amax(1).exp()
    theirs_dev = dev[:, k] / guard.profile["bounds"][k]
    err = max((mine_conf - conf[:, k]).abs().max().item(),
              ((mine_dev - theirs_dev).abs() / theirs_dev.clamp_min(1e-6)).max().item())
    if err > 1e-3:
        raise SystemExit(f"the attack's head {k} does not reproduce the guard (error {err:.2e})")
    if stable(guard):  # the fall in log-odds, to within float32 rounding of confidences near 1
        with torch.no_grad():
            mine = stability_fall(guard, x, k, log_odds)
            theirs = guard.stability_ratios(x, conf)[:, k].double() * guard.stability["bound"]
        fall_err = (mine - theirs).abs().max().item()
        if fall_err > 0.1:
            raise SystemExit(f"the attack's stability fall does not reproduce the guard's ({fall_err:.3f})")
        err = max(err, fall_err)
    return err


def stable(guard) -> bool:
    return guard.stability is not None and guard.config.stability_test


def stability_fall(guard, x, k, log_odds):
    """How far head ``k``'s log-odds (``log_odds`` on ``x``), capped as the guard caps them, fall
    from ``x`` to the guard's neighbours of ``x`` (their mean, with several); differentiable in ``x``."""
    near, _ = target_head_terms(guard, guard.neighbour(x), k)
    cap = torch.logit(torch.tensor(1 - STABILITY_EPS))
    near = near.clamp(-cap, cap).reshape(-1, len(x)).mean(0)  # [M * B] pattern-major -> [B]
    return log_odds.clamp(-cap, cap) - near


def stability_hinge(guard, x, k, log_odds):
    """Hinge on head ``k``'s stability test: its fall beyond the bound less the margin (0 when the
    test passes)."""
    return torch.relu(stability_fall(guard, x, k, log_odds) - guard.stability["bound"] + MARGIN)


def attack(guard, x, k, eps, steps, lo, hi):
    """PGD (sign steps of ``2.5 eps / steps``) on the hinge losses of head ``k``'s tests (confidence,
    consistency and, where the guard has it, stability)."""
    if eps == 0:
        return x.clone()
    thr = torch.logit(guard.thresholds[k].clamp(1e-6, 1 - 1e-6))
    delta = torch.zeros_like(x)
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        log_odds, log_ratio = target_head_terms(guard, x + delta, k)
        loss = (torch.relu(thr - log_odds + MARGIN) + torch.relu(log_ratio + MARGIN).sum(1)).sum()
        if stable(guard):
            loss = loss + stability_hinge(guard, x + delta, k, log_odds).sum()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - step * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(lo, hi) - x
    return (x + delta).detach()


def judged(guard, x, k):
    """The real guard on ``x``: shares answered with the target (hint reading) and accepted as it."""
    r = guard(x)
    return {"target_answer": (r.labels == k).double().mean().item(),
            "target_accepted": ((r.labels == k) & (r.verdict == ACCEPT)).double().mean().item(),
            "alarm": (r.verdict == 1).double().mean().item(),
            "ood": (r.verdict == 2).double().mean().item()}


def run(dataset, attack_name, n, eps_list, steps, source, without_stability=False, guard_tag=None,
        work=None):
    work = Path(work) if work else ROOT / "runs" / dataset
    split = experiment.split_data(dataset, source, None, 0)
    model, meta = experiment.load_model(work / "models" / f"{attack_name}-0.safetensors")
    backdoor = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    tag = f"-{guard_tag}" if guard_tag else ""
    guard = LinkBreaker.load(work / "guards" / f"{attack_name}-0{tag}.safetensors", model)
    if without_stability:  # the same guard with the test switched off: what the test itself adds
        guard.config = dataclasses.replace(guard.config, stability_noise=0.0, stability_jitter=0.0)
    xc, yc, xt, _, k = experiment.eval_sets(backdoor, split["x_test"], split["y_test"], 4 * n, n, 0,
                                            HELDOUT)
    xc = xc[yc != k][:n]  # clean inputs of other classes: the attack with no trigger to help it
    lo, hi = guard.input_range
    err = check_surrogate(guard, xt[:64], k)
    rows = []
    for eps in eps_list:
        t0 = time.time()
        row = {"eps": eps, "eps_255": round(eps * 255, 3)}
        for name, x in (("triggered", xt), ("clean", xc)):
            xa = attack(guard, x, k, eps, steps, lo, hi)
            with torch.no_grad():
                bare = model(xa).argmax(1)
            row[name] = {"bare_model_target": (bare == k).double().mean().item(), **judged(guard, xa, k)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{dataset}/{attack_name} eps {row['eps_255']}/255: triggered {row['triggered']} "
              f"clean {row['clean']}", flush=True)
    report = {"dataset": dataset, "attack": attack_name, "seed": 0, "split": "heldout",
              "target": k, "n_triggered": len(xt), "n_clean": len(xc), "steps": steps,
              "step_size": "2.5 * eps / steps", "margin": MARGIN, "surrogate_max_error": err,
              "work": str(work), "model": experiment.model_arch(meta),
              "recipe": experiment.model_recipe(meta),
              "guard_config": config_record(guard.config), "guard_tag": guard_tag,
              "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = tag + ("-without-stability" if without_stability else "")
    (OUT / f"{dataset}-{attack_name}-0{suffix}.json").write_text(json.dumps(report, indent=2))


def table():
    lines = ["# An adaptive attacker against the guard (held-out, seed 0)", "",
             "PGD on the triggered input (L-inf budget eps, image kept in range) so that the target "
             "head passes the confidence test and every consistency bound, judged by the real guard "
             "(`scripts/adaptive_attack.py`; per-run JSON beside this file). *answered*: the guard's "
             "label is the target (the hint reading of the held-out tables: the ASR after the "
             "guard); *accepted*: an accept verdict for the target. *clean*: the same attack on clean "
             "inputs of other classes (no trigger). *bare*: the unguarded model's answer is the "
             "target. Percentages.", "",
             "*stability*: whether the guard had the neighbour stability test (and the attacker its "
             "hinge): *noise*, the default Gaussian neighbours; *jitter*, the geometric neighbours "
             "of the `jitter` variant guard (`--guard-tag jitter`); *no*: rows that predate the "
             "test; *switched off*: the same saved guard as a test row with the test off "
             "(`--without-stability`), the test's own effect.", "",
             "| model | stability | eps | triggered: bare | answered | accepted | alarm | OOD | clean: bare | answered | accepted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(OUT.glob("*-0*.json"), key=lambda q: (q.stem.endswith("without-stability"), q.stem)):
        rep = json.loads(path.read_text())
        if "rows" not in rep:  # the Fig. 14 training runs share the folder
            continue
        cfg = rep["guard_config"]
        tests = [name for name, field in (("noise", "stability_noise"), ("jitter", "stability_jitter"))
                 if cfg.get(field, 0) > 0]
        test = " + ".join(tests) if tests else (
            "switched off" if path.stem.endswith("without-stability") else "no")
        for r in rep["rows"]:
            t, c = r["triggered"], r["clean"]
            lines.append(f"| {rep['dataset']} {rep['attack']} | {test} | {r['eps_255']:g}/255 | "
                         f"{100 * t['bare_model_target']:.1f} | {100 * t['target_answer']:.1f} | "
                         f"{100 * t['target_accepted']:.1f} | {100 * t['alarm']:.1f} | {100 * t['ood']:.1f} | "
                         f"{100 * c['bare_model_target']:.1f} | {100 * c['target_answer']:.1f} | "
                         f"{100 * c['target_accepted']:.1f} |")
    (OUT / "adaptive.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10", choices=["mnist", "cifar10", "gtsrb"])
    p.add_argument("--attacks", nargs="*", default=["badnets"])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--eps", type=float, nargs="+", default=[0, 2, 4, 8], help="budgets, in 1/255")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--without-stability", action="store_true",
                   help="switch the saved guard's stability test off (the ablation of the test)")
    p.add_argument("--work", default=None,
                   help="the reproduce cache holding models/<attack>-0 and guards/ (default runs/<dataset>)")
    p.add_argument("--guard-tag", default=None,
                   help="attack the variant guard <attack>-0-<tag>.safetensors (linkbreaker reproduce --tag)")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        return table()
    torch.manual_seed(0)
    for a in args.attacks:
        run(args.dataset, a, args.n, [e / 255 for e in args.eps], args.steps, args.data,
            args.without_stability, args.guard_tag, args.work)
    table()


if __name__ == "__main__":
    main()
