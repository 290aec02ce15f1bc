"""``graft report``: one PNG a person reads at a glance, from a head version's stored metrics.

Four panels: the confusion matrix with class names, per-class precision / recall /
F1, the reliability curve (is a 0.8 confidence right 80 % of the time?), and the
hyper-parameter trials of the search. matplotlib's Agg backend: no display needed.
"""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from client.models import HeadVersion


def draw(version: HeadVersion, out: Path) -> None:
    """``version`` as ``Client.get_head_version`` gives it: a head's versions carry only their metrics' summary."""
    metrics = version.metrics
    missing = [key for key in ("confusion", "per_class") if key not in metrics]
    if missing:
        raise ValueError(f"{version.name} has no {', '.join(missing)} in its metrics: train it again to report on it")
    fig, axes = plt.subplots(2, 2, figsize=(13, 10.5), dpi=110)
    accuracy, ece, examples = metrics.get("accuracy"), metrics.get("ece"), metrics.get("num_examples")
    balanced = metrics.get("balanced_accuracy")
    fig.suptitle(
        f"{version.display}  ·  {version.kind} on {version.backbone}  ·  hold-out accuracy "
        f"{_number(accuracy)} (balanced {_number(balanced)})  ·  ECE {_number(ece)}  ·  "
        f"{int(examples or 0)} hold-out images",
        fontsize=13,
        fontweight="bold",
    )
    _confusion(axes[0, 0], version.classes, metrics["confusion"])
    _per_class(axes[0, 1], metrics["per_class"])
    _reliability(axes[1, 0], metrics.get("reliability") or [])
    _trials(axes[1, 1], metrics.get("trials") or [], (metrics.get("recipe") or {}).get("chosen"), version.hyperparams)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, format="png")
    plt.close(fig)


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _confusion(ax: Any, classes: list[str], confusion: list[list[int]]) -> None:
    counts = np.array(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # colour: share of each true class
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (count; colour = share of the true class)")
    if len(classes) <= 20:
        for i in ticks:
            for j in ticks:
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if shares[i, j] > 0.5 else "black",
                    fontsize=11 if len(classes) <= 10 else 7,
                )


def _per_class(ax: Any, per_class: list[dict[str, Any]]) -> None:
    labels = [c["label"] for c in per_class]
    x = np.arange(len(labels))
    for offset, key, colour in ((-0.27, "precision", "#4c72b0"), (0.0, "recall", "#dd8452"), (0.27, "f1", "#55a868")):
        values = [c.get(key) or 0.0 for c in per_class]
        bars = ax.bar(x + offset, values, 0.26, label=key, color=colour)
        if len(labels) <= 10:
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=1)
    ax.set_xticks(
        x, [f"{c['label']}\n(n={c.get('support', 0)})" for c in per_class], rotation=45 if len(labels) > 6 else 0
    )
    ax.set_ylim(0, 1.25)
    ax.set_title("Per class: precision, recall, F1 (n = hold-out images)")
    ax.legend(loc="upper center", ncols=3)


def _reliability(ax: Any, bins: list[dict[str, Any]]) -> None:
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    filled = [b for b in bins if b.get("count")]
    if filled:
        width = filled[0]["hi"] - filled[0]["lo"]
        ax.bar(
            [b["lo"] for b in filled],
            [b["accuracy"] for b in filled],
            width,
            align="edge",
            alpha=0.7,
            color="#4c72b0",
            edgecolor="white",
            label="accuracy in bin",
        )
        ax.plot(
            [b["confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            "o-",
            color="#c44e52",
            label="mean confidence → accuracy",
        )
        for b in filled:
            ax.annotate(
                str(b["count"]),
                (b["lo"] + width / 2, b["accuracy"]),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    else:
        ax.text(0.5, 0.5, "no reliability bins stored\n(trained before they were kept)", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability curve (numbers: images per bin)")
    ax.legend(loc="best")


def _trials(ax: Any, trials: list[dict[str, Any]], chosen: dict[str, Any] | None, hyperparams: dict[str, Any]) -> None:
    """Each trial's validation score (k-fold mean with its spread, or hold-out accuracy), the chosen one green."""
    if not trials:
        ax.text(0.5, 0.5, "no search: one fixed configuration", ha="center", va="center")
        ax.set_axis_off()
        return
    scores = [t.get("val_accuracy") or 0.0 for t in trials]

    def is_chosen(t: dict[str, Any]) -> bool:
        recipe = (t.get("scaling"), t.get("class_weighting"))
        picked = (chosen or {}).get("scaling"), (chosen or {}).get("class_weighting")
        return t.get("hp") == hyperparams and (chosen is None or recipe == picked)

    best = next((i for i, t in enumerate(trials) if is_chosen(t)), max(range(len(trials)), key=lambda i: scores[i]))
    varied = [k for k in trials[0].get("hp", {}) if len({repr(t["hp"].get(k)) for t in trials}) > 1]
    recipes = [k for k in ("scaling", "class_weighting") if len({t.get(k) for t in trials}) > 1]
    labels = [
        ", ".join([*(str(t[k]) for k in recipes), *(_setting(k, t["hp"][k]) for k in varied)]) or f"trial {i + 1}"
        for i, t in enumerate(trials)
    ]
    colours = ["#55a868" if i == best else "#8c8c8c" for i in range(len(trials))]
    spread = [float(np.std(t["cv_folds"])) if t.get("cv_folds") else 0.0 for t in trials]
    y = np.arange(len(trials))
    ax.barh(y, scores, xerr=spread, color=colours)
    for i, t in enumerate(trials):
        loss = t.get("val_loss")
        outcome = "  (k folds)" if t.get("cv_folds") else f"  (loss {loss:.3f})" if loss is not None else "  (diverged)"
        ax.text(scores[i] + 0.01, i, f"{scores[i]:.3f}{outcome}", va="center", fontsize=7 if len(trials) > 16 else 8)
    ax.set_yticks(y, labels, fontsize=6 if len(trials) > 16 else 8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_xlabel("validation score (k folds: mean ± spread of the objective)")
    ax.set_title(f"Search: {len(trials)} trials (green: chosen)")


def _setting(key: str, value: object) -> str:
    """One searched hyper-parameter as a short label, e.g. ``wd=0.01``."""
    return f"{_short(key)}={value:.2g}" if isinstance(value, float) else f"{_short(key)}={value}"


def _short(key: str) -> str:
    return {"weight_decay": "wd", "label_smoothing": "ls", "batch_size": "bs"}.get(key, key)
