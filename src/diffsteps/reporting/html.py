"""``report.html``: a run's or a multirun's results as one self-contained file, readable without any account or
network — every figure embedded as a base64 PNG ``data:`` URI, the metrics table, the Pareto front and the config
(YAML). No scripts, fonts, style sheets or images are fetched from anywhere.

Rendering only: :mod:`.report` collects the rows and Pareto fronts and calls :func:`run_page` / :func:`sweep_page`
(``report.run_report``, ``report.summarize``). Standard library only, so cheap to import.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

from .files import write_text

__all__ = ["run_page", "sweep_page", "render", "figure", "table"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1150px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
div.wide{overflow-x:auto}pre{background:#f7f7f7;padding:.6em;font-size:.78em;overflow:auto;max-height:40em}
"""
# figures of a run folder, in reading order: curves first, then grids of samples
_RUN_FIGURES = ("*_vs_nfe.png", "grid_steps_*.png", "grid_*.png", "trajectory*.png", "*.png")
_NUMBER_DIGITS = 6  # shown with 6 significant digits; the exact values are in metrics.json / summary.csv


def figure(png: str | Path, caption: str | None = None) -> str:
    """``<figure>`` with the PNG embedded as a ``data:image/png;base64`` URI."""
    png = Path(png)
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    cap = html.escape(caption or png.name)
    return (f'<figure><img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{html.escape(str(v if v is not None else ''))}</td>"
    if isinstance(v, (int, float)):
        text = f"{v:.{_NUMBER_DIGITS}g}" if isinstance(v, float) and math.isfinite(v) else str(v)
        return f'<td class="num">{text}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, table_id: str | None = None) -> str:
    """An HTML table of ``rows`` (dicts) under ``columns`` (default: every key, in order of appearance)."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return f'<div class="wide"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole page: ``sections`` are (heading, HTML body) pairs."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections if body]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _figures(folder: Path, patterns: Sequence[str]) -> str:
    seen, out = set(), []
    for pattern in patterns:
        for png in sorted(folder.glob(pattern)):
            if png not in seen:
                seen.add(png)
                out.append(figure(png))
    return "\n".join(out)


def _fronts(fronts: dict[str, list[dict]]) -> str:
    out = []
    for m, front in fronts.items():
        if front:
            wanted = ("group", "sampler", "spacing", "steps", "nfe", m, f"{m}_ci")
            cols = [c for c in wanted if any(c in r for r in front)]
            out.append(f"<h3>{html.escape(m)}</h3>" + table(front, cols, table_id=f"pareto-{m}"))
    return "\n".join(out)


def run_page(run_dir: str | Path, rows: list[dict], fronts: dict[str, list[dict]]) -> Path:
    """``<run_dir>/report.html``: the run's ``rows`` (table ``#metrics``), the NFE Pareto ``fronts`` ({metric:
    rows}, tables ``#pareto-<metric>``), every PNG figure of the folder and its ``config.yaml``. Returns its path."""
    run_dir = Path(run_dir)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    sampler = ", ".join(dict.fromkeys(str(r.get("sampler", "")) for r in rows))
    page = render(f"diffsteps run: {sampler} — {run_dir.name}", [
        ("Metrics (metrics.json)", table(rows, table_id="metrics")),
        ("Pareto front: quality against NFE", _fronts(fronts)),
        ("Figures", _figures(run_dir, _RUN_FIGURES)),
        ("Config (config.yaml)", _pre(config) if config else ""),
    ])
    return write_text(run_dir / "report.html", page)


def sweep_page(sweep_dir: str | Path, rows: list[dict], seeds: list[dict], fronts: dict[str, list[dict]]) -> Path:
    """``<sweep_dir>/report.html`` for a multirun or sweep: the means over ``seeds`` ± 95 % interval (table
    ``#seeds``) when seeds vary, the Pareto ``fronts``, the summary figures, every job's ``rows`` (``#metrics``, the
    numbers of summary.csv), the GP sweep's results and plots if any, and the config (the first job's
    ``config.yaml``, else the sweep's ``multirun.yaml``). Returns its path."""
    sweep_dir = Path(sweep_dir)
    drop = ("dir", "overrides")
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in drop]
    config = ""
    for candidate in (*sorted(sweep_dir.glob("*/config.yaml")), sweep_dir / "multirun.yaml"):
        if candidate.is_file():
            config = f"# {candidate.relative_to(sweep_dir)}\n" + candidate.read_text()
            break
    gp = sweep_dir / "optimization_results.yaml"
    page = render(f"diffsteps sweep: {sweep_dir.name}", [
        ("Mean over seeds ± 95 % interval (Student t)", table(seeds, table_id="seeds") if seeds else ""),
        ("Pareto front: quality against NFE" + (" (means over seeds)" if seeds else ""), _fronts(fronts)),
        ("Figures", _figures(sweep_dir, ("summary_*.png", "convergence.png", "partial_dependence.png"))),
        (f"Every job's rows ({len(rows)}, summary.csv)", table(rows, columns, table_id="metrics")),
        ("GP sweep (optimization_results.yaml)", _pre(gp.read_text()) if gp.is_file() else ""),
        ("Config", _pre(config) if config else ""),
    ])
    return write_text(sweep_dir / "report.html", page)
