"""The diagnosis report as a console table and a picture."""

from __future__ import annotations

import torch

# --- report ----------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The console table: clean accuracy per item kind, then one row per condition (and the skipped
    ones with their reason), then the attention share per layer x modality."""
    lines = [
        f"{'condition':<26} {'items':>5} {'acc.':>6} {'clean':>6} {'flip':>6} {'causal effect':>15} {'JS':>17}",
    ]
    for k, v in report["clean"].items():
        lines.append(f"{'clean ' + k:<26} {report['items'][k]:>5} {v['accuracy']:>6.3f}")
    for name, c in report["conditions"].items():
        ce, js = c["causal_effect"], c["js"]
        lines.append(
            f"{name:<26} {c['items']:>5} {c['accuracy']:>6.3f} {c['clean_accuracy']:>6.3f} {c['flip_rate']:>6.3f} "
            f"{ce['mean']:>+7.3f} ± {ce['std']:<5.3f} {js['mean']:>8.2e} ± {js['std']:<6.1e}"
        )
        for reason, count in c.get("items_skipped_reasons", {}).items():
            lines.append(f"{'':<26} {count} item(s) left out: {reason}")
    for name, reason in report["skipped"].items():
        lines.append(f"{name:<26} skipped: {reason}")
    att = report.get("attention")
    if att:
        mods = att["modalities"]
        lines.append("")
        lines.append("attention share of the answer positions (rows: layer)")
        for ptype, share in [("all items", att["share"]), *att["share_by_prompt_type"].items()]:
            lines.append(f"  {ptype:<16}" + "".join(f"{m:>9}" for m in mods))
            for li, row in enumerate(share):
                lines.append(f"  {'layer ' + str(li):<16}" + "".join(f"{v:>9.3f}" for v in row))
        for pair, d in att["cohens_d"].items():
            lines.append(f"  Cohen's d, {pair}")
            for li, row in enumerate(d):
                cells = "".join(f"{'-':>9}" if v is None else f"{v:>+9.2f}" for v in row)
                lines.append(f"  {'layer ' + str(li):<16}" + cells)
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> str:
    """``diagnosis.png``: flip rate and JS per condition (bars), attention share (layer x modality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["conditions"])
    att = report.get("attention")
    fig, axes = plt.subplots(1, 3 if att else 2, figsize=(15 if att else 11, 4.2))
    xs = range(len(names))
    flip = [report["conditions"][n]["flip_rate"] for n in names]
    js = [report["conditions"][n]["js"]["mean"] for n in names]
    for ax, vals, title in ((axes[0], flip, "flip rate"), (axes[1], js, "JS (clean vs perturbed), nats")):
        ax.bar(list(xs), vals, color="tab:blue" if title == "flip rate" else "tab:orange")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].set_ylim(0, 1.05)
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
