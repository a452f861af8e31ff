"""report.html, a run's or a multirun's results in one self-contained file: read back with Python's html.parser —
every figure an embedded PNG that decodes, the tables' numbers those of the results files, nothing fetched from
anywhere. (The README's screenshot is of such a report, opened in headless Chromium.)"""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser

import pytest
from PIL import Image
from seed_sweep import seed_sweep

from diffsteps.reporting.report import run_report

pytestmark = pytest.mark.xdist_group("seed_sweep")  # one worker makes the shared multirun (conftest.py)


class Page(HTMLParser):
    """Every tag's attributes, and each table (by id) as rows of cell texts."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check_self_contained(page: Page) -> list[Image.Image]:
    """No tag that loads anything (script, link, iframe, …), no attribute pointing at http(s); every <img> a PNG
    data: URI that decodes. Returns the images."""
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "source")]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not str(value).lower().startswith(("http:", "https:", "//")), (tag, name, value)
    images = []
    for tag, attrs in page.tags:
        if tag == "img":
            head, _, data = attrs["src"].partition(",")
            assert head == "data:image/png;base64"
            raw = base64.b64decode(data, validate=True)
            assert raw[:8] == b"\x89PNG\r\n\x1a\n"
            img = Image.open(io.BytesIO(raw))
            img.load()  # decodes every pixel: a truncated PNG fails here
            assert img.width > 100 and img.height > 100
            images.append(img)
    return images


def table_dicts(rows: list[list[str]]) -> list[dict]:
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def same_number(shown: str, value) -> bool:
    """A cell shows 6 significant digits of the file's float (ints and text exactly)."""
    if isinstance(value, float):
        return float(shown) == pytest.approx(value, rel=5e-6, abs=1e-12)
    return shown == str(value)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return seed_sweep(tmp_path_factory)


def test_run_report_embeds_every_figure_and_the_metrics(sweep):
    job = sweep / "0"
    page = Page((job / "report.html").read_text())
    images = check_self_contained(page)
    figures = sorted(job.glob("*.png"))
    assert len(images) == len(figures) >= 5  # 3 curves, 2 grids, the steps grid
    for img, png in zip(sorted(images, key=lambda i: i.size), sorted(figures, key=lambda p: Image.open(p).size)):
        assert img.size == Image.open(png).size
    rows = json.loads((job / "metrics.json").read_text())
    shown = table_dicts(page.tables["metrics"])
    assert len(shown) == len(rows)
    for cells, row in zip(shown, rows):
        assert set(cells) == set(row)
        for k, v in row.items():
            assert same_number(cells[k], v), (k, cells[k], v)
    front = table_dicts(page.tables["pareto-fid"])
    assert {int(r["nfe"]) for r in front} <= {r["nfe"] for r in rows} and front
    text = (job / "report.html").read_text()
    assert "seed: 0" in text and "sampler:" in text  # the config


def test_sweep_report_holds_the_seed_intervals_and_every_job(sweep):
    page = Page((sweep / "report.html").read_text())
    images = check_self_contained(page)
    assert len(images) == len(list(sweep.glob("summary_*.png"))) == 3  # fid, kid_mean, nll with error bars
    with open(sweep / "summary_seeds.csv") as f:
        want = list(csv.DictReader(f))
    shown = table_dicts(page.tables["seeds"])
    assert len(shown) == len(want) == 2
    for cells, row in zip(shown, want):
        for k in ("fid", "fid_ci", "kid_mean", "kid_mean_ci", "nll", "nll_ci", "kid_std"):
            assert same_number(cells[k], float(row[k])), k
    with open(sweep / "summary.csv") as f:
        jobs = list(csv.DictReader(f))
    shown = table_dicts(page.tables["metrics"])
    assert len(shown) == len(jobs) == 4
    for cells, row in zip(shown, jobs):
        assert same_number(cells["fid"], float(row["fid"])) and cells["seed"] == row["seed"]


def test_run_report_of_a_hand_made_folder(tmp_path):
    # the smallest run folder: metrics only (no figures, no config) still makes a valid page
    rows = [{"sampler": "ddim", "steps": 5, "nfe": 5, "fid": 1.25, "note": "<b>&"}]
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    page = Page(run_report(tmp_path).read_text())
    assert check_self_contained(page) == []
    [cells] = table_dicts(page.tables["metrics"])
    assert cells == {"sampler": "ddim", "steps": "5", "nfe": "5", "fid": "1.25", "note": "<b>&"}  # escaped text
