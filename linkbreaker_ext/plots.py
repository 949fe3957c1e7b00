"""Plots in the paper's style: confidence distributions (Figs. 4 and 6: for clean and triggered
inputs of one class, every head's own-class confidence T(x)_k beside its threshold) and rates over
one setting (Figs. 10-12)."""
from __future__ import annotations

from pathlib import Path



def confidence_distributions(conf_clean, y_clean, conf_trig, y_trig, thresholds, cls: int, path,
                             title: str = ""):
    """Save a two-panel box plot (clean / triggered inputs whose true class is ``cls``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = conf_clean.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, conf, y, name in ((axes[0], conf_clean, y_clean, "clean"),
                              (axes[1], conf_trig, y_trig, "triggered")):
        rows = conf[y.cpu() == cls].cpu().float()
        if len(rows):
            ax.boxplot([rows[:, k].numpy() for k in range(n)], positions=list(range(n)),
                       widths=0.6, showfliers=True, flierprops={"markersize": 2})
        ax.scatter(range(n), thresholds.cpu().numpy(), marker="_", s=300, color="red",
                   label="threshold", zorder=3)
        ax.set_title(f"{name} inputs of class {cls} (n={len(rows)})")
        ax.set_xlabel("head k (class-restricted prediction)")
        ax.set_xticks(range(n))
    axes[0].set_ylabel("confidence T(x)_k")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(loc="center right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def percent_curves(rows, x_key: str, series, xlabel: str, title: str, path, x_scale: float = 1.0):
    """Save a line plot of rate columns (fractions, drawn in %) over one setting, one point per row
    (a dict): ``series`` is ``[(key, label), ...]``; the paper's Figs. 10-12 style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [x_scale * r[x_key] for r in rows]
    for key, label in series:
        ax.plot(xs, [100 * r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
