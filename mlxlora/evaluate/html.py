"""eval_report.html: one self-contained page (inline CSS and script, no external asset, no server).

It holds the table of means (id "means": one row per model, one column per metric), and the answers
side by side (id "rows": one row per data row, one answer column per model, the primary score under
each answer, marked fixed / broke against the base). A search box and a fixed / broke filter hide
rows in the browser.
"""

from __future__ import annotations

from html import escape

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
#rows td{max-width:28em;white-space:pre-wrap;word-break:break-word}
td.fixed{background:#e6f6e6} td.broke{background:#fbe4e4}
.score{display:block;color:#666;font-size:12px;margin-top:.3em}
#controls{margin:1em 0} #search{width:24em;padding:.3em}
"""

_SCRIPT = """
function applyFilter(){
  var q=document.getElementById('search').value.toLowerCase();
  var f=document.getElementById('filter').value;
  var shown=0;
  document.querySelectorAll('#rows tbody tr').forEach(function(tr){
    var ok=(!q||tr.textContent.toLowerCase().indexOf(q)>=0);
    if(ok&&f){var p=f.split(':');ok=(' '+(tr.dataset[p[0]]||'')+' ').indexOf(' '+p[1]+' ')>=0;}
    tr.style.display=ok?'':'none'; if(ok)shown++;
  });
  document.getElementById('shown').textContent=shown;
}
// ?q=word&filter=fixed:NAME in the address fills the controls (a link to a search; headless tests use it).
document.addEventListener('DOMContentLoaded',function(){
  var p=new URLSearchParams(location.search);
  if(p.has('q'))document.getElementById('search').value=p.get('q');
  if(p.has('filter'))document.getElementById('filter').value=p.get('filter');
  applyFilter();
});
"""


def _means_table(report: dict) -> str:
    metrics, means = report["metrics"], report["means"]
    head = "".join(f"<th>{escape(m)}</th>" for m in metrics)
    extra = "<th>fixed</th><th>broke</th>"
    body = []
    for name in report["models"]:
        cells = "".join(f'<td class="num">{means[name][m]:.4f}</td>' for m in metrics)
        ch = report["changes"].get(name)
        counts = (f'<td class="num">{len(ch["fixed"])}</td><td class="num">{len(ch["broke"])}</td>' if ch
                  else "<td></td><td></td>")
        body.append(f"<tr><th>{escape(name)}</th>{cells}{counts}</tr>")
    return (f'<table id="means"><thead><tr><th>model</th>{head}{extra}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _rows_table(report: dict) -> str:
    primary, models = report["primary"], report["models"]
    head = "".join(f"<th>{escape(n)}</th>" for n in models)
    marks = {n: (set(ch["fixed"]), set(ch["broke"])) for n, ch in report["changes"].items()}
    body = []
    for i, it in enumerate(report["items"]):
        fixed = " ".join(n for n, (f, _) in marks.items() if i in f)
        broke = " ".join(n for n, (_, b) in marks.items() if i in b)
        cells = []
        for n in models:
            cls = "fixed" if n in marks and i in marks[n][0] else "broke" if n in marks and i in marks[n][1] else ""
            s = it["scores"][n][primary]
            cells.append(f'<td class="{cls}">{escape(it["answers"][n])}'
                         f'<span class="score">{escape(primary)} {s:.3f}</span></td>')
        body.append(f'<tr data-fixed="{escape(fixed)}" data-broke="{escape(broke)}"><td class="num">{it["line"]}</td>'
                    f'<td>{escape(it["prompt"])}</td><td>{escape(it["reference"])}</td>{"".join(cells)}</tr>')
    return (f'<table id="rows"><thead><tr><th>line</th><th>prompt</th><th>reference</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _filter_options(report: dict) -> str:
    opts = ['<option value="">all rows</option>']
    for n in report["changes"]:
        opts.append(f'<option value="fixed:{escape(n)}">fixed by {escape(n)}</option>')
        opts.append(f'<option value="broke:{escape(n)}">broke by {escape(n)}</option>')
    return "".join(opts)


def report_html(report: dict) -> str:
    """The whole page for a generative_eval report (mlxlora.evaluate.generative)."""
    adapters = "".join(f"<li>{escape(n)}: {escape(str(p))}</li>" for n, p in report["adapters"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlxlora eval report</title>
<style>{_CSS}</style></head>
<body>
<h1>mlxlora eval --generate</h1>
<p>{report['rows']} rows of {escape(report['data'])} (split {escape(report['split'])}), greedy answers of at most
{report['max_tokens']} tokens. Primary metric: <b>{escape(report['primary'])}</b>; a row is <i>fixed</i> when an
adapter scores above the base on it, <i>broke</i> when below.</p>
<ul>{adapters}</ul>
<h2>Means</h2>
{_means_table(report)}
<h2>Answers</h2>
<div id="controls"><input id="search" type="search" placeholder="search prompts, references and answers"
 oninput="applyFilter()"> <select id="filter" onchange="applyFilter()">{_filter_options(report)}</select>
 <span id="shown">{report['rows']}</span> rows shown</div>
{_rows_table(report)}
<script>{_SCRIPT}</script>
</body></html>
"""


__all__ = ["report_html"]
