"""eval_report.html in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it) loads the
file with no server, runs its script, and the dumped DOM has the tables, one row per data row, and the
search box hides the rows that do not match."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

import tiny
from mlxlora.config import LoraConfig

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
ROWS = [
    {"prompt": "Define zebra.", "completion": "a striped horse"},
    {"prompt": "Define kettle.", "completion": "a pot that boils water"},
    {"prompt": "Define <b>bold</b> & brave.", "completion": "fearless"},
]


def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        if os.environ.get("MLXLORA_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH; .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); .ci/run installs it and runs this test")
    return found


def dump_dom(page, query: str = "") -> str:
    """The DOM after the page's scripts ran, as Chromium serialises it."""
    # Without the OpenBLAS preload the test command exports (mlxlora.blas): under it Chromium's GPU process dies.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
    res = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--user-data-dir=" + str(page.parent / ".chromium"), "--dump-dom",
                          page.as_uri() + query], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


class Tables(HTMLParser):
    """Rows (cell texts, and whether the row is hidden) of every table with an id."""

    def __init__(self):
        super().__init__()
        self.tables, self.table, self.row, self.cell = {}, None, None, None
        self.shown = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self.table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self.table is not None:
            self.row = {"cells": [], "hidden": "display: none" in (a.get("style") or "")}
            self.table.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []
        elif tag == "span" and a.get("id") == "shown":
            self.cell, self.row = [], None

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None and self.cell is not None:
            self.row["cells"].append("".join(self.cell))
            self.cell = None
        elif tag == "span" and self.row is None and self.cell is not None:
            self.shown, self.cell = "".join(self.cell), None
        elif tag == "table":
            self.table = self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def parse(dom: str) -> Tables:
    t = Tables()
    t.feed(dom)
    return t


@pytest.fixture(scope="module")
def report(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    src = tiny_dirs["llama"]
    adapter = tiny.make_adapter(src, root / "qv", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3, size=0.3)
    (root / "data").mkdir()
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = tiny.run_cli("eval", "--generate", "--model", src, "--adapter", f"qv={adapter}", "--data", root / "data",
                       "--max-tokens", 5, "--out", root / "out")
    assert res.exit_code == 0, res.output
    return root / "out" / "eval_report.html", json.loads((root / "out" / "eval_report.json").read_text())


def test_chromium_loads_the_report_and_finds_the_tables(report):
    page, data = report
    t = parse(dump_dom(page))
    means = t.tables["means"]
    assert means[0]["cells"][:3] == ["model", "token_f1", "exact"]
    assert [r["cells"][0] for r in means[1:]] == ["base", "qv"]
    assert float(means[1]["cells"][1]) == pytest.approx(data["means"]["base"]["token_f1"], abs=5e-5)
    rows = t.tables["rows"][1:]
    assert len(rows) == len(ROWS) and not any(r["hidden"] for r in rows)
    assert [r["cells"][1] for r in rows] == [r["prompt"] for r in ROWS]  # escaped markup comes back as text
    assert rows[0]["cells"][3].startswith(data["items"][0]["answers"]["base"])
    assert t.shown == str(len(ROWS))


def test_chromium_search_hides_the_other_rows(report):
    page, _ = report
    t = parse(dump_dom(page, "?q=KETTLE"))
    rows = t.tables["rows"][1:]
    assert [r["hidden"] for r in rows] == [True, False, True]
    assert t.shown == "1"
