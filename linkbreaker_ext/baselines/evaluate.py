"""One baseline measured the way the guard is: fit on the clean validation set, then CDA/ASR (and for
input-level detectors TPR/FPR and AUROC of the continuous score) on the same clean and triggered test
inputs. A flagged input is an error on clean data and no success for the attacker (the rule that
counts LinkBreaker's refusals); a repaired model is scored by its labels."""
from __future__ import annotations

import time

from .. import training
from . import make_defense, roc_auc


def _rate(mask):
    return mask.float().mean().item() if mask.numel() else float("nan")


def detector_after(model, flag_c, flag_t, sets):
    xc, yc, xt, yt, target = sets
    pc = training.predict_logits(model, xc).argmax(1)
    pt = training.predict_logits(model, xt).argmax(1)
    return {"cda": _rate(~flag_c & (pc == yc)), "asr": _rate(~flag_t & (pt == target)),
            "r_acc": _rate(~flag_t & (pt == yt)), "alarm_rate_clean": _rate(flag_c),
            "alarm_rate_trigger": _rate(flag_t)}


def evaluate_defense(name, model, x_val, y_val, num_classes, sets, seed=0):
    """``(defense, report)`` for baseline ``name`` on ``sets`` = ``(xc, yc, xt, yt, target)``
    (:func:`experiment.eval_sets`)."""
    xc, yc, xt, yt, target = sets
    d = make_defense(name, seed=seed)
    d.fit(model, x_val, y_val, num_classes)
    rep = {"settings": d.settings(), "defense": name}
    if d.kind == "input":
        start = time.perf_counter()
        sc = d.score(xc).cpu()
        online = time.perf_counter() - start
        st = d.score(xt).cpu()
        fc, ft = sc > d.threshold, st > d.threshold
        rep.update(after=detector_after(model, fc, ft, sets), auroc=roc_auc(sc, st), tpr=_rate(ft),
                   fpr=_rate(fc), threshold=d.threshold)
        if hasattr(d, "depths"):
            rep["ibd_psc"] = {"depths": d.depths, "clean_error_by_depth": d.clean_error_by_depth}
    else:
        start = time.perf_counter()
        pc = d.predict(xc, model)
        online = time.perf_counter() - start
        pt = d.predict(xt, model)
        rep["after"] = {"cda": _rate(pc == yc), "asr": _rate(pt == target), "r_acc": _rate(pt == yt)}
        rep["flagged"] = d.flagged
        rep["repaired"] = d.repaired is not None
        rep["report"] = {k: v for k, v in d.report.items()
                         if k not in ("stimulation_scores", "mean_activation")}
        if getattr(d, "pruned", None) is not None:  # Fine-Pruning's first step on its own
            p1c = training.predict_logits(d.pruned, xc).argmax(1)
            p1t = training.predict_logits(d.pruned, xt).argmax(1)
            rep["after_prune"] = {"cda": _rate(p1c == yc), "asr": _rate(p1t == target),
                                  "r_acc": _rate(p1t == yt)}
    rep["timing"] = {"offline_s": d.fit_s, "online_ms_per_sample": 1000 * online / max(len(xc), 1)}
    return d, rep
