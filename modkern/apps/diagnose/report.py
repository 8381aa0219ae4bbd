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


# --- two checkpoints side by side ------------------------------------------------------------------

COMPARED = (("accuracy", "acc. %"), ("flip_rate", "flip %"))


def comparison(before: dict, after: dict) -> dict:
    """Per condition of both reports: accuracy, flip rate, causal effect and JS of each and the
    difference (after - before); clean accuracy per item kind likewise."""
    rows = {}
    for name in [n for n in before["conditions"] if n in after["conditions"]]:
        b, a = before["conditions"][name], after["conditions"][name]
        row = {}
        for key in ("accuracy", "flip_rate"):
            row[key] = {"before": b[key], "after": a[key], "change": a[key] - b[key]}
        for key in ("causal_effect", "js"):
            row[key] = {"before": b[key], "after": a[key], "change": a[key]["mean"] - b[key]["mean"]}
        rows[name] = row
    clean = {
        k: {"before": before["clean"][k]["accuracy"], "after": after["clean"][k]["accuracy"]}
        for k in before["clean"]
        if k in after["clean"]
    }
    return {"before": before["model"], "after": after["model"], "clean": clean, "conditions": rows}


def format_comparison(comp: dict) -> str:
    """The console table of :func:`comparison` (before -> after, percent / points and 10^-3 nats)."""
    lines = [
        f"before: {comp['before']}",
        f"after:  {comp['after']}",
        f"{'condition':<24} {'acc. %':>17} {'flip %':>17} {'causal effect, pp':>19} {'JS, 10^-3 nats':>21}",
    ]
    for k, v in comp["clean"].items():
        lines.append(f"{'clean ' + k:<24} {PERCENT * v['before']:>7.1f} -> {PERCENT * v['after']:<6.1f}")
    for name, row in comp["conditions"].items():
        cells = [f"{PERCENT * row[k]['before']:>7.1f} -> {PERCENT * row[k]['after']:<6.1f}" for k, _ in COMPARED]
        ce, js = row["causal_effect"], row["js"]
        cells.append(f"{PERCENT * ce['before']['mean']:>+8.2f} -> {PERCENT * ce['after']['mean']:<+8.2f}")
        cells.append(f"{MILLINATS * js['before']['mean']:>9.3f} -> {MILLINATS * js['after']['mean']:<9.3f}")
        lines.append(f"{name:<24} " + " ".join(cells))
    return "\n".join(lines)


def plot_comparison(comp: dict, path: str) -> str:
    """``comparison.png``: flip rate and JS per condition, the two checkpoints' bars side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comp["conditions"])
    xs = torch.arange(len(names)).float()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title, scale in (
        (axes[0], "flip_rate", "flip rate, %", PERCENT),
        (axes[1], "js", "JS clean vs perturbed, 10^-3 nats (± sd over items)", MILLINATS),
    ):
        for shift, side, color in ((-0.2, "before", "tab:gray"), (0.2, "after", "tab:green")):
            rows = [comp["conditions"][n][key][side] for n in names]
            vals = [scale * (r["mean"] if isinstance(r, dict) else r) for r in rows]
            err = [scale * r["std"] for r in rows] if key == "js" else None
            ax.bar((xs + shift).tolist(), vals, width=0.4, yerr=err, capsize=3, color=color, label=comp[side])
        ax.set_xticks(xs.tolist())
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("modkern diagnose: before / after", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
