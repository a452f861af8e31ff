"""Classifier-free guidance on class-conditional digits: the report of a ``python run.py -m experiment=cond_digits``
sweep (one class-conditional UNet, guidance scales 0, 1, 2, 4, each at several step counts, the same noise and the
same balanced requested classes everywhere).

Reads every job's ``metrics.json`` under the sweep folder and writes there

- ``cond_fid_vs_steps.png`` and ``cond_agreement_vs_steps.png``: FID (digits-classifier features) and class agreement
  (the shipped digits classifier's prediction equals the requested class; chance 0.1) against sampling steps, a line
  per guidance scale;
- ``cond_fid_vs_agreement.png``: FID against agreement across scales, a line per step count (the quality/fidelity
  trade-off guidance moves along; Ho & Salimans 2022, Fig. 4 draw FID against Inception score the same way);

and prints the table (one line per scale and step count: NFE, FID, agreement, classifier confidence).

Run: ``python experiments/cond_digits.py <sweep folder>`` (the folder ``run.py -m experiment=cond_digits`` printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diffsteps.reporting.report import collect


def table(rows: list[dict]) -> list[dict]:
    """Rows of a conditional sweep as (scale, steps, nfe, fid, agreement, confidence), sorted."""
    out = []
    for r in rows:
        if "classifier_agreement" not in r:
            raise ValueError(f"job {r['job']} has no classifier_agreement: not a conditional digits run "
                             "(experiment=cond_digits sets data.conditional=true)")
        out.append({"scale": float(r.get("guidance_scale", 1.0)), "steps": int(r["steps"]), "nfe": int(r["nfe"]),
                    "fid": float(r["fid"]), "agreement": float(r["classifier_agreement"]),
                    "confidence": float(r["classifier_confidence"])})
    return sorted(out, key=lambda r: (r["scale"], r["steps"]))


def figures(rows: list[dict], out_dir: Path) -> list[Path]:
    scales = sorted({r["scale"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    paths = []
    for key, label in (("fid", "FID (digits features)"), ("agreement", "class agreement")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for w in scales:
            pts = [(r["steps"], r[key]) for r in rows if r["scale"] == w]
            ax.plot(*zip(*pts), "o-", label=f"w = {w:g}")
        ax.set_xscale("log")
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
    ax.set_ylabel("FID (digits features)")
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
    print("| guidance scale w | steps | NFE | FID | class agreement | classifier confidence |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']:g} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['agreement']:.3f} | "
              f"{r['confidence']:.3f} |")
    for p in figures(rows, args.sweep_dir):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
