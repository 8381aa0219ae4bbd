"""The diagnosis report as a console table and a picture."""

from __future__ import annotations

import torch

# --- report ----------------------------------------------------------------------------------------


# One unit per quantity, as in the demo's tables: accuracy, flip rate and causal effect in percent
# (points), JS in 10^-3 nats; diagnosis.json keeps fractions and nats.
PERCENT, MILLINATS = 100.0, 1e3


def format_table(report: dict) -> str:
    """The console table: clean accuracy per item kind, then one row per condition (and the skipped
    ones with their reason), then the attention share per layer x modality."""
    lines = [
        f"{'condition':<26} {'items':>5} {'acc. %':>7} {'clean %':>7} {'flip %':>7} {'causal effect, pp':>19} "
        f"{'JS, 10^-3 nats':>19}",
    ]
    for k, v in report["clean"].items():
        lines.append(f"{'clean ' + k:<26} {report['items'][k]:>5} {PERCENT * v['accuracy']:>7.1f}")
    for name, c in report["conditions"].items():
        ce, js = c["causal_effect"], c["js"]
        lines.append(
            f"{name:<26} {c['items']:>5} {PERCENT * c['accuracy']:>7.1f} {PERCENT * c['clean_accuracy']:>7.1f} "
            f"{PERCENT * c['flip_rate']:>7.1f} {PERCENT * ce['mean']:>+9.2f} ± {PERCENT * ce['std']:<7.2f} "
            f"{MILLINATS * js['mean']:>9.3f} ± {MILLINATS * js['std']:<7.3f}"
        )
        for reason, count in c.get("items_skipped_reasons", {}).items():
            lines.append(f"{'':<26} {count} item(s) left out: {reason}")
    for name, reason in report["skipped"].items():
        lines.append(f"{name:<26} skipped: {reason}")
    att = report.get("attention")
    if att:
        lines += ["", *_attention_lines(att)]
    return "\n".join(lines)


def _attention_lines(att: dict) -> list:
    mods = att["modalities"]
    lines = ["attention share of the answer positions (rows: layer)"]
    for ptype, share in [("all items", att["share"]), *att["share_by_prompt_type"].items()]:
        lines.append(f"  {ptype:<16}" + "".join(f"{m:>9}" for m in mods))
        for li, row in enumerate(share):
            lines.append(f"  {'layer ' + str(li):<16}" + "".join(f"{v:>9.3f}" for v in row))
    for pair, d in att["cohens_d"].items():
        lines.append(f"  Cohen's d, {pair}")
        for li, row in enumerate(d):
            cells = "".join(f"{'-':>9}" if v is None else f"{v:>+9.2f}" for v in row)
            lines.append(f"  {'layer ' + str(li):<16}" + cells)
    if att["cohens_d"] and "cohens_d_note" in att:
        lines.append(f"  (-: {att['cohens_d_note']})")
    return lines


def plot_report(report: dict, path: str) -> str:
    """``diagnosis.png``: flip rate and JS per condition (bars), attention share (layer x modality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["conditions"])
    att = report.get("attention")
    fig, axes = plt.subplots(1, 3 if att else 2, figsize=(15 if att else 11, 4.2))
    xs = list(range(len(names)))
    conditions = [report["conditions"][n] for n in names]
    flip = [PERCENT * c["flip_rate"] for c in conditions]
    # a flip rate's spread is its binomial standard error; JS's the sd over the items
    flip_se = [PERCENT * (c["flip_rate"] * (1 - c["flip_rate"]) / max(c["items"], 1)) ** 0.5 for c in conditions]
    js = [MILLINATS * c["js"]["mean"] for c in conditions]
    js_sd = [MILLINATS * c["js"]["std"] for c in conditions]
    panels = (
        (axes[0], flip, flip_se, "flip rate, % (± binomial s.e.)", "tab:blue"),
        (axes[1], js, js_sd, "JS clean vs perturbed, 10^-3 nats (± sd over items)", "tab:orange"),
    )
    for ax, vals, err, title, color in panels:
        ax.bar(xs, vals, yerr=err, capsize=3, color=color)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 105)
    if att:
        share = torch.tensor(att["share"])
        ax = axes[2]
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(att["modalities"])))
        ax.set_xticklabels(att["modalities"])
        ax.set_yticks(range(att["layers"]))
        ax.set_ylabel("layer")
        ax.set_title("attention share of the answer positions")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"modkern diagnose: {report['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
