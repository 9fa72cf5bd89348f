"""The monitoring report a person reads: one HTML page, its figures drawn with matplotlib's
object-oriented Figure (no pyplot state) and embedded as PNG data URIs, so the page is one
file that MLflow shows as an artifact and a browser opens offline."""

from __future__ import annotations

import base64
import html
import io


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(title: str, labels, ref, win, ylabel: str) -> str:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, 0.4, label="reference (validation)", color="#8aa")
    ax.bar(x + 0.2, win, 0.4, label="window", color="#c63")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def _psi(checks) -> str:
    from matplotlib.figure import Figure

    inputs = [c for c in checks if c["kind"] == "input"]
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    colours = ["#c33" if c["drifted"] else "#8aa" for c in inputs]
    ax.bar([c["name"] for c in inputs], [c["effect"] for c in inputs], color=colours)
    if inputs:
        ax.axhline(inputs[0]["threshold"], color="k", lw=0.8, ls="--", label="min_psi")
        ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    ax.set_title("input drift: PSI per feature (red: alerts)", fontsize=10)
    return _png(fig)


def render(summary: dict) -> str:
    """The page for a summary (digits.monitor.command's JSON)."""
    checks = summary["checks"]
    by = {c["name"]: c for c in checks}
    figs = []
    if summary["window"]["pieces"]:
        d = by["digit shares"]
        figs.append(
            _bars("digit shares (accepted pieces)", range(10), d["reference"], d["window"], "share")
        )
        c = by["confidence"]
        labels = [f"bin {i + 1}" for i in range(len(c["reference"]))]
        figs.append(
            _bars(
                "confidence, in the reference's decile bins",
                labels,
                c["reference"],
                c["window"],
                "share",
            )
        )
        figs.append(_psi(checks))
    rows = "".join(
        f"<tr class={'alert' if c['drifted'] else 'ok'}><td>{html.escape(c['kind'])}</td>"
        f"<td>{html.escape(c['name'])}</td><td>{c['p']:.3g}</td><td>{c['effect']:+.4f}</td>"
        f"<td>{c['threshold']:g}</td><td>{'ALERT' if c['drifted'] else 'ok'}</td></tr>"
        for c in checks
    )
    fb = summary["corrections"]
    acc = "n/a" if fb["accuracy"] is None else f"{fb['accuracy']:.3f}"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in summary["reasons"]) or "<li>none</li>"
    w, m = summary["window"], summary["model"]
    verdict = "ALERT" if summary["alert"] else "no alert"
    images = "".join(f'<p><img src="{src}" alt="figure"></p>' for src in figs)
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<title>digits monitor: {html.escape(m["name"])} v{m["version"]}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}
td,th{{padding:2px 8px;text-align:left}} tr.alert{{background:#fdd}}</style></head><body>
<h1>{html.escape(m["name"])} version {html.escape(str(m["version"]))}: {verdict}</h1>
<p>Window {w["start"]} to {w["end"]} UTC: {w["answers"]} answers, {w["pieces"]} pieces
(reference: {summary["reference"]["pieces"]} validation pieces).
Corrections: {fb["count"]}, accuracy of the corrected answers {acc}.</p>
<h2>Reasons</h2><ul>{reasons}</ul>
{images}
<h2>Every check</h2>
<p>Alerts when p &lt; {summary["level"]:.2g} (alpha / checks, Bonferroni) and the effect is at
least the floor (PSI; for the refusal rate, the absolute change).</p>
<table><tr><th>kind</th><th>what</th><th>p</th><th>effect</th><th>floor</th><th></th></tr>
{rows}</table></body></html>
"""
