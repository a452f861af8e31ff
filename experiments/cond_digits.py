"""Classifier-free guidance on class-conditional data with a shipped classifier: the report of a
``python run.py -m experiment=cond_digits`` or ``python run.py -m experiment=mnist1d`` sweep (one class-conditional
net, guidance scales 0, 1, 2, 4, each at several step counts, the same noise and the same balanced requested classes
everywhere).

Reads every job's ``metrics.json`` under the sweep folder and writes there

- ``cond_fid_vs_steps.png`` and ``cond_agreement_vs_steps.png``: FID (in the data's classifier features: digits or
  MNIST-1D) and class agreement (the shipped classifier's prediction equals the requested class; chance 0.1) against
  sampling steps, a line per guidance scale; for signals also ``cond_spectral_distance_vs_steps.png`` (the
  log-spectral distance of the mean power spectra, dB);
- ``cond_fid_vs_agreement.png``: FID against agreement across scales, a line per step count (the quality/fidelity
  trade-off guidance moves along; Ho & Salimans 2022, Fig. 4 draw FID against Inception score the same way);

and prints the table (one line per scale and step count: NFE, FID, [spectral distance,] agreement, classifier
confidence).

Run: ``python experiments/cond_digits.py <sweep folder>`` (the folder ``run.py -m experiment=...`` printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diffsteps.reporting.plots import plain_log_axis
from diffsteps.reporting.report import collect


def table(rows: list[dict]) -> list[dict]:
    """Rows of a conditional sweep as (scale, steps, nfe, fid, agreement, confidence, and spectral distance where
    every row has one), sorted."""
    out = []
    spectral = all("spectral_distance" in r for r in rows)
    for r in rows:
        if "classifier_agreement" not in r:
            raise ValueError(f"job {r['job']} has no classifier_agreement: not a conditional run on data with a "
                             "shipped classifier (experiment=cond_digits and experiment=mnist1d set "
                             "data.conditional=true)")
        out.append({"scale": float(r.get("guidance_scale", 1.0)), "steps": int(r["steps"]), "nfe": int(r["nfe"]),
                    "fid": float(r["fid"]), "agreement": float(r["classifier_agreement"]),
                    "confidence": float(r["classifier_confidence"]), "data": _data_name(r)}
                   | ({"spectral_distance": float(r["spectral_distance"])} if spectral else {}))
    return sorted(out, key=lambda r: (r["scale"], r["steps"]))


def _data_name(row: dict) -> str:
    """The data set a row is of, for the axis labels: the data class's name without ``Data`` (Digits, MNIST1D)."""
    return str(row.get("data", "")).rsplit(".", 1)[-1].removesuffix("Data") or "data"


def figures(rows: list[dict], out_dir: Path) -> list[Path]:
    scales = sorted({r["scale"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    fid_label = f"FID ({rows[0]['data']} classifier features)"
    curves = [("fid", fid_label), ("agreement", "class agreement")]
    if "spectral_distance" in rows[0]:
        curves.append(("spectral_distance", "spectral distance (dB)"))
    paths = []
    for key, label in curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for w in scales:
            pts = [(r["steps"], r[key]) for r in rows if r["scale"] == w]
            ax.plot(*zip(*pts), "o-", label=f"w = {w:g}")
        plain_log_axis(ax, steps)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        if key == "agreement":
            ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"cond_{key}_vs_steps.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in steps:
        pts = sorted((r["agreement"], r["fid"], r["scale"]) for r in rows if r["steps"] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{n} steps")
        for a, f, w in pts:
            ax.annotate(f"{w:g}", (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("class agreement (labels: guidance scale w)")
    ax.set_ylabel(fid_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "cond_fid_vs_agreement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths + [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    rows = table(collect(args.sweep_dir))
    spectral = "spectral_distance" in rows[0]
    print("| guidance scale w | steps | NFE | FID |" + (" spectral distance (dB) |" if spectral else "")
          + " class agreement | classifier confidence |")
    print("|---|---|---|---|" + ("---|" if spectral else "") + "---|---|")
    for r in rows:
        sd = f" {r['spectral_distance']:.2f} |" if spectral else ""
        print(f"| {r['scale']:g} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} |{sd} {r['agreement']:.3f} | "
              f"{r['confidence']:.3f} |")
    for p in figures(rows, args.sweep_dir):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
