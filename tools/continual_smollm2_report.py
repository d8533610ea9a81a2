"""Tables and plots of the SmolLM2 continual-learning study (``tools/continual_smollm2.py``)."""

from __future__ import annotations

from memzoo.atomic import atomic_file


def kl_frontier(points, key, level):
    eligible = [p[key] for p in points if p["method"] == "smf" and p["rank"] == "kl" and p["recall_b"] >= level - 1e-9]
    return min(eligible) if eligible else None


def table(points) -> str:
    lines = ["| method | rank | top_t | lr | steps | new-fact recall | old-fact recall | old-fact drop | "
             "Shakespeare ppl | Python-docs ppl | held-out loss increase | train s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        lines.append(f"| {p['method']} | {p['rank'] or '–'} | {p['top_t'] or '–'} | {p['lr']:g} | {p['steps']} | "
                     f"{p['recall_b']:.2f} | {p['recall_a']:.3f} | {p['recall_a_drop']:+.3f} | "
                     f"{p['ppl']['shakespeare']:.2f} | {p['ppl']['python_docs']:.2f} | "
                     f"{p['heldout_loss_increase']:+.4f} | {p['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(points, level, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "tab:red", "lora": "tab:blue", "smf-tfidf": "tab:green", "smf-kl": "tab:olive"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "recall_a_drop", "old-fact (country facts) recall drop"),
                           (axes[1], "heldout_loss_increase", "held-out loss increase (nats)")):
        seen = set()
        for run in sorted({(p["method"], p["rank"], p["lr"], p["top_t"]) for p in points}, key=str):
            pts = sorted((p for p in points if (p["method"], p["rank"], p["lr"], p["top_t"]) == run),
                         key=lambda p: p["steps"])
            style = run[0] if run[1] is None else f"smf-{run[1]}"
            ax.plot([p["recall_b"] for p in pts], [p[key] for p in pts], "o-", color=colors[style], alpha=0.7,
                    ms=3, label=None if style in seen else style)
            seen.add(style)
        ax.axvline(level, color="gray", ls=":", lw=1)
        ax.set_xlabel("new-fact recall (learning)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M + Memory+: learning new facts vs forgetting")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
