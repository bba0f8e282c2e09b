"""Write the report: consistency.json (every number), report.md (the tables), figures/*.png, and
index.html — one self-contained page (figures embedded as data URIs) that opens without a server."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata

from mergemix.artifacts import atomic_path, write_json, write_text
from mergemix.report.metrics import fmt


@dataclass
class Consistency:
    """Everything the report shows; `data` is what consistency.json holds."""

    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The agreement table, one line per target: merge ρ against the mean of the seeds [95% over
        mixtures], merge ρ against one seed beside the noise ceiling, the no-merge predictors' ρ."""
        lines = [self.data["verdict"], ""]
        lines += [f"{'target':<28}{'merge rho':>10}{'95% (mixtures)':>17}{'1 seed':>8}{'ceiling':>9}{'interp':>8}"
                 f"{'tok-KL':>8}{'log-prior':>10}{'partial':>9}"]
        for name, t in self.data["targets"].items():
            m = t["merge"]
            ci = m["spearman_ci_mixtures"]
            lines.append(
                f"{name:<28}{fmt(m['spearman']):>10}{f'[{fmt(ci[0])}, {fmt(ci[1])}]':>17}"
                f"{fmt(m['spearman_one_seed']):>8}{fmt(t['ceiling']):>9}"
                f"{fmt(t['interpolation']['spearman']):>8}{fmt(t['token_closeness']['spearman']):>8}"
                f"{fmt(t['log_prior']['spearman']):>10}{fmt(t['partial_merge_given_interpolation']):>9}"
            )
        real = self.data["trained_for_real"]
        lines.append("")
        lines.append("trained for real (objective, mean over seeds): " + ", ".join(
            f"{k} {fmt(v['mean'], 3)}" for k, v in real.items()))
        c = self.data["compute"]
        lines.append(f"compute: mixture runs used {c['mixture_over_proposal']:.1f}x the FLOPs of the proposal "
                     f"({c['mixture_flops']:.3g} vs {c['proposal_flops']:.3g})")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


PREDICTORS = {
    "merge": "merged proxy",
    "interpolation": "interpolation of the experts' scores",
    "token_closeness": "closeness to token-proportional",
    "log_prior": "log prior",
}
HIGHLIGHT = {"proposal": "tab:red", "uniform": "tab:green", "token_prior": "tab:orange"}


def _ci(ci: list[float | None] | None) -> str:
    return "" if not ci or ci[0] is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


# ------------------------------------------------------------------------------------------------ tables


def agreement_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per target: the merge's agreement with the truth, the noise ceiling beside the merge's ρ
    against one seed, and the predictors that need no merge."""
    head = ["target", "merge ρ", "95% over mixtures", "95% under item noise", "merge τ", "top-25% ρ",
            "pairwise acc", "recovery", "merge ρ vs one seed", "noise ceiling", "interpolation ρ", "token-KL ρ",
            "log-prior ρ", "partial ρ | interp", "argmax true rank", "regret"]
    rows = []
    for name, t in data["targets"].items():
        m = t["merge"]
        rows.append([
            name, fmt(m["spearman"]), _ci(m["spearman_ci_mixtures"]), _ci(m.get("spearman_ci_items")),
            fmt(m["kendall"]), fmt(m["top25_spearman"]), fmt(m["pairwise_accuracy"]), fmt(m["recovery"]),
            fmt(m["spearman_one_seed"]), fmt(t["ceiling"]), fmt(t["interpolation"]["spearman"]), fmt(t["token_closeness"]["spearman"]),
            fmt(t["log_prior"]["spearman"]), fmt(t["partial_merge_given_interpolation"]),
            f"{m['true_rank']} of {len(data['mixtures'])}", fmt(m["regret"], 3),
        ])
    return head, rows


def rank_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per mixture, best real objective first: weights, proxy score and rank, real score (mean and
    range over seeds) and rank, and the interpolation of the experts' scores. Ties share the better rank."""
    mixtures = data["mixtures"]
    proxy_rank = rankdata([-m["proxy"]["objective"] for m in mixtures], method="min").astype(int)
    true_rank = rankdata([-m["truth"]["objective"] for m in mixtures], method="min").astype(int)
    head = ["mixture", *data["domains"], "proxy objective", "proxy rank", "real objective", "seed range",
            "real rank", "interpolation"]
    rows = []
    for i in np.argsort(true_rank, kind="stable"):
        m = mixtures[i]
        seeds = [s["objective"] for s in m["truth_seeds"]]
        rows.append([m["label"], *(f"{m['alpha'][d]:.3f}" for d in data["domains"]), fmt(m["proxy"]["objective"], 3),
                     str(proxy_rank[i]), fmt(m["truth"]["objective"], 3), f"{min(seeds):.3f} … {max(seeds):.3f}",
                     str(true_rank[i]), fmt(m["interpolation"]["objective"], 3)])
    return head, rows


def compute_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Tokens and FLOPs of the proposal against the report's mixture runs."""
    c = data["compute"]
    return ["", "tokens trained", "evaluations", "FLOPs"], [
        ["proposal (experts + merged proxies)", f"{c['proposal_train_tokens']:,}", str(c["proposal_evaluations"]),
         f"{c['proposal_flops']:.3g}"],
        ["report (real mixture runs)", f"{c['mixture_train_tokens']:,}", str(c["mixture_evaluations"]),
         f"{c['mixture_flops']:.3g}"],
        ["ratio", "", "", f"{c['mixture_over_proposal']:.1f}x"],
    ]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


# ----------------------------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _scatter(data: dict[str, Any]) -> bytes:
    """Proxy vs real score per mixture, one panel for the objective and one per capability."""
    names = [n for n in data["targets"] if not n.startswith("benchmark:")]
    fig = Figure(figsize=(4.2 * len(names), 4))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for m in data["mixtures"]:
            seeds = [s[name] for s in m["truth_seeds"]]
            color = HIGHLIGHT.get(m["label"], "tab:blue")
            ax.errorbar(m["proxy"][name], m["truth"][name], xerr=m["proxy_se"][name],
                        yerr=[[m["truth"][name] - min(seeds)], [max(seeds) - m["truth"][name]]],
                        fmt="o", color=color, ms=5, capsize=2, lw=0.8)
            if m["label"] in HIGHLIGHT:
                ax.annotate(m["label"], (m["proxy"][name], m["truth"][name]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        t = data["targets"][name]
        ax.set_title(f"{name}\nρ = {fmt(t['merge']['spearman'])} (ceiling {fmt(t['ceiling'])})", fontsize=9)
        ax.set_xlabel("merged proxy")
        ax.set_ylabel("trained for real (seed range)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _predictors(data: dict[str, Any]) -> bytes:
    """ρ of every predictor on the objective with its 95% interval over mixtures, and the noise ceiling."""
    t = data["targets"]["objective"]
    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    labels, values, lo, hi = [], [], [], []
    for key, label in PREDICTORS.items():
        a = t[key]
        v = a["spearman"] if a["spearman"] is not None else 0.0
        ci = a["spearman_ci_mixtures"]
        labels.append(label)
        values.append(v)
        lo.append(max(0.0, v - ci[0]) if ci[0] is not None else 0.0)
        hi.append(max(0.0, ci[1] - v) if ci[1] is not None else 0.0)
    ax.barh(labels, values, xerr=[lo, hi], color=["tab:blue", "tab:gray", "tab:gray", "tab:gray"], capsize=3)
    if t["ceiling"] is not None:
        ax.axvline(t["ceiling"], color="k", ls="--", lw=1, label=f"noise ceiling {t['ceiling']:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman ρ with the real mixture runs (objective)")
    ax.invert_yaxis()
    fig.tight_layout()
    return _png(fig)


def _interference(data: dict[str, Any]) -> bytes:
    inter, names = data["interference"], data["domains"]
    panels = [("task-vector cosine", inter["cosine"], "coolwarm", (-1, 1))]
    if inter.get("gamma"):
        g = np.array(inter["gamma"])
        panels.append(("γ (row k: curvature of k along j's gradient / own)", g, "viridis", (0, max(1.5, g.max()))))
    fig = Figure(figsize=(4.6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, matrix, cmap, (vmin, vmax)) in zip(axes[0], panels, strict=True):
        mat = np.asarray(matrix)
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _png(fig)


def _trained(data: dict[str, Any]) -> bytes:
    """The proposal against uniform and token-proportional, each trained for real (every seed shown)."""
    real = data["trained_for_real"]
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    for x, (label, v) in enumerate(real.items()):
        ax.bar(x, v["mean"], color=HIGHLIGHT.get(label, "tab:blue"), alpha=0.7)
        ax.scatter([x] * len(v["seeds"]), v["seeds"], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(real)), list(real))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("objective, trained for real")
    fig.tight_layout()
    return _png(fig)


FIGURES = {
    "scatter": ("Merged proxy vs trained for real", _scatter),
    "predictors": ("Every predictor against the truth", _predictors),
    "trained": ("Proposal vs baselines, trained for real", _trained),
    "interference": ("Interference between domains", _interference),
}


# ------------------------------------------------------------------------------------------------ output


def write_report(result: Consistency, report_dir: Path) -> None:
    """Figures, consistency.json, report.md and index.html in `report_dir`, each written atomically."""
    data = result.data
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for key, (_, draw) in FIGURES.items():
        figures[key] = draw(data)
        with atomic_path(report_dir / "figures" / f"{key}.png") as tmp:
            tmp.write_bytes(figures[key])
    write_json(report_dir / "consistency.json", data)
    tables = {"agreement": agreement_rows(data), "ranks": rank_rows(data), "compute": compute_rows(data)}
    s = data["settings"]
    intro = (f"{s['mixtures']} mixtures, each trained {s['seeds']}x for real ({s['mixture_steps']} steps from the "
             f"base) and ranked by the merged proxy ({s['expert_steps']}-step experts, replay {s['replay']}). "
             "The noise ceiling is the rank agreement between two trainings of the same mixtures (seed vs seed); "
             "compare it with the merge's ρ against one seed. Against the mean of the seeds, which is less noisy, "
             "a good proxy can exceed it. Intervals: 95% bootstrap over mixtures; 95% range under item noise "
             "(scores redrawn within their standard errors).")
    md = [f"# Rank consistency\n\n**{data['verdict']}**\n\n{intro}\n"]
    md += [f"- warning: {w}" for w in result.warnings]
    md += ["\n## Agreement with the real mixture runs\n", _md_table(*tables["agreement"]),
           "\n## Mixtures, ranked by the real runs\n", _md_table(*tables["ranks"]),
           "\n## Compute\n", _md_table(*tables["compute"]), ""]
    md += [f"\n## {title}\n\n![{key}](figures/{key}.png)\n" for key, (title, _) in FIGURES.items()]
    write_text(report_dir / "report.md", "\n".join(md))
    imgs = "".join(
        f'<h2>{html.escape(title)}</h2><img class="figure" alt="{key}" '
        f'src="data:image/png;base64,{base64.b64encode(figures[key]).decode()}">'
        for key, (title, _) in FIGURES.items()
    )
    warn = "".join(f'<p class="warning">{html.escape(w)}</p>' for w in result.warnings)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mergemix rank consistency</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;
margin:1em 0;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,
th:first-child{{text-align:left}}.warning{{background:#fff3cd;padding:6px 10px;border-left:4px solid #e0a800}}
img.figure{{max-width:100%}}.verdict{{font-size:15px}}</style></head><body><h1>Rank consistency</h1>
<p class="verdict"><strong>{html.escape(data["verdict"])}</strong></p><p>{html.escape(intro)}</p>{warn}
<h2>Agreement with the real mixture runs</h2>{_html_table(*tables["agreement"], "agreement-table")}
<h2>Mixtures, ranked by the real runs</h2>{_html_table(*tables["ranks"], "rank-table")}
<h2>Compute</h2>{_html_table(*tables["compute"], "compute-table")}{imgs}</body></html>
"""
    write_text(report_dir / "index.html", page)
