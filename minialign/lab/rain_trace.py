"""Watching RAIN search: a record of every iteration and commit, as JSON Lines and as one HTML page.

``SearchTrace`` is handed to ``Rain`` (``rain_decode(..., trace=SearchTrace())``); the search calls it
after every iteration (the selected path, whether it rewound, the text it judged and the score, how
many siblings shared the score by Eq. 2, dynamic additions) and before every commit (the subtree under
the search root with visits, values and priors, and the stop-rule gauges). ``write_html`` renders the
records of one or more searches as a self-contained page (inline SVG, script and style; nothing is
fetched): per commit step the tree with node size = visits and colour = value, each iteration's path in
order with rewinds marked, the judge's verdict, the gauges, and the answer growing.

    python decode.py --method rain --trace out/rain_trace.html            # one prompt
    python decode.py --method rain --eval --n_eval 2 --trace out/rain_trace.html
"""
import json
import os

from ..checkpoint import atomic_write_text


class SearchTrace:
    """Records one RAIN search (one prompt)."""

    def __init__(self):
        self.ids: dict = {}  # node -> a small integer id, stable for the page
        self.steps: list[dict] = []
        self.iterations: list[dict] = []
        self.seen = {"rewinds": 0, "additions": 0}
        self.prompt, self.answer, self.gauges = "", "", {}

    def node_id(self, node) -> int:
        return self.ids.setdefault(node, len(self.ids))

    def iteration(self, search, path, evaluated: str, finished: bool, score: float, similar: int) -> None:
        """After an iteration: its path (search root to leaf), the judged text and the judge's verdict."""
        p_harmful = search.judge.memo[(evaluated, finished)][1]
        self.iterations.append({
            "path": [self.node_id(n) for n in path],
            "rewind": search.stats["rewinds"] > self.seen["rewinds"],
            "added": search.stats["additions"] - self.seen["additions"],
            "text": evaluated, "finished": finished, "score": round(score, 3),
            "p_harmful": [round(float(p), 3) for p in p_harmful], "similar": similar})
        self.seen = {k: search.stats[k] for k in self.seen}

    def commit(self, search, best) -> None:
        """Before a commit: the subtree under the search root, the gauges, the committed set."""
        p = search.params
        self.prompt = search.prompt
        self.steps.append({
            "nodes": self.subtree(search, search.root),
            "iterations": self.iterations,
            "committed": search.tok.decode(best.tokens), "committed_id": self.node_id(best),
            "answer_before": search.tok.decode(search.reply_tokens(search.root)),
            "gauges": {"best_fn": best.real_visits, "T_m": p.commit_visits, "best_q": round(best.q, 3), "V": p.commit_value,
                       "root_fn": search.root.real_visits, "T": p.max_visits}})
        self.iterations = []

    def subtree(self, search, root) -> list[dict]:
        rows, stack = [], [root]
        while stack:
            node = stack.pop()
            rows.append({"id": self.node_id(node), "parent": self.node_id(node.parent) if node is not root else None,
                         "text": search.tok.decode(node.tokens) if node is not search.context else "",
                         "n": round(node.n, 3), "fn": node.real_visits, "q": round(node.q, 3), "prior": round(node.prior, 4),
                         "terminal": node.terminal})
            stack.extend(reversed(node.children))
        return rows

    def finish(self, answer: str) -> dict:
        self.answer = answer
        return {"prompt": self.prompt, "answer": answer, "steps": self.steps}


def write_jsonl(path: str, searches: list[dict]) -> None:
    """One JSON object per search: prompt, answer, and its steps (nodes, iterations, gauges)."""
    atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in searches))


def write_html(path: str, searches: list[dict]) -> None:
    """The self-contained page for the given searches (see the module docstring)."""
    data = json.dumps(searches).replace("</", "<\\/")  # never closes the script element early
    atomic_write_text(path, PAGE.replace("/*DATA*/null", data))


def write_trace(path: str, searches: list[dict]) -> list[str]:
    """``path``.html gets the page and a .jsonl beside it the records; returns both paths."""
    stem = os.path.splitext(path)[0]
    write_html(stem + ".html", searches)
    write_jsonl(stem + ".jsonl", searches)
    return [stem + ".html", stem + ".jsonl"]


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>RAIN search trace</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
.bar { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin: 6px 0; }
.answer { font-family: ui-monospace, monospace; background: #f4f4f4; padding: 6px 8px; white-space: pre-wrap; }
.answer .new { background: #c8e6c9; }
.main { display: flex; gap: 16px; align-items: flex-start; }
svg { border: 1px solid #ddd; background: #fff; }
.node circle { stroke: #444; stroke-width: 1; }
.node.onpath circle { stroke: #000; stroke-width: 3; }
.node.committed circle { stroke: #1565c0; stroke-width: 3; stroke-dasharray: 3 2; }
.node text { font: 11px ui-monospace, monospace; }
.edge { stroke: #bbb; }
.edge.onpath { stroke: #000; stroke-width: 2; }
#iters { max-height: 560px; overflow-y: auto; min-width: 380px; }
#iters div { padding: 2px 4px; cursor: pointer; font-family: ui-monospace, monospace; font-size: 12px; }
#iters div.sel { background: #fff3c4; }
.rewind { color: #b71c1c; font-weight: bold; }
.gauge { display: inline-block; width: 120px; height: 10px; background: #eee; vertical-align: middle; position: relative; }
.gauge span { position: absolute; left: 0; top: 0; bottom: 0; background: #42a5f5; }
.gauge i { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #c62828; }
</style></head><body>
<h1>RAIN search trace</h1>
<div class="bar"><label>prompt <select id="prompt"></select></label>
<button id="prev">&larr; step</button><span id="stepinfo"></span><button id="next">step &rarr;</button></div>
<div class="answer" id="answer"></div>
<div class="bar" id="gauges"></div>
<div class="main"><svg id="tree" width="760" height="560"></svg><div id="iters"></div></div>
<div class="bar" id="detail"></div>
<p>Node size: visits n; colour: value q from red (-1, harmful) to green (+1, harmless); dashed blue: the set
committed at the end of this step. Click an iteration (or use the arrow keys) to see its path; <span class="rewind">&#8634;</span> marks a rewind
(the leaf is not below the previous iteration's leaf).</p>
<script>
const DATA = /*DATA*/null;
let s = 0, step = 0, iter = -1;
const $ = (id) => document.getElementById(id);
const esc = (t) => t.replace(/[&<>]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"})[c]);
const shown = (t) => JSON.stringify(t).slice(1, -1);
function colour(q) { const g = Math.round(200 * (q + 1) / 2), r = 200 - g; return `rgb(${r + 40},${g + 40},70)`; }
function gauge(label, value, limit, max) {
  const w = Math.min(1, value / max) * 100, m = Math.min(1, limit / max) * 100;
  return `${label} ${value} (limit ${limit}) <span class="gauge"><span style="width:${w}%"></span><i style="left:${m}%"></i></span>`;
}
function layout(nodes) {  // leaves left to right in depth-first order, parents centred over children
  const kids = {}, pos = {}; let next = 0, depth = 0;
  nodes.forEach((n) => { (kids[n.parent] = kids[n.parent] || []).push(n); });
  function place(n, d) {
    depth = Math.max(depth, d);
    const c = kids[n.id] || [];
    c.forEach((k) => place(k, d + 1));
    pos[n.id] = { x: c.length ? (pos[c[0].id].x + pos[c[c.length - 1].id].x) / 2 : next++, y: d };
  }
  place(nodes[0], 0);
  return { pos, width: Math.max(1, next), depth };
}
function draw() {
  const search = DATA[s], st = search.steps[step];
  if (!st) { $("stepinfo").textContent = "this search committed nothing"; return; }
  if (iter < 0 || iter >= st.iterations.length) iter = st.iterations.length - 1;  // show the last path
  $("stepinfo").textContent = `commit step ${step + 1} of ${search.steps.length}`;
  $("answer").innerHTML = esc(st.answer_before) + `<span class="new">${esc(st.committed)}</span>`;
  const g = st.gauges;
  $("gauges").innerHTML = gauge("best child real visits fn", g.best_fn, g.T_m + 1, Math.max(g.T, g.best_fn)) + " &nbsp; "
    + gauge("best child value q (+1 scale)", (g.best_q + 1).toFixed(2), (g.V + 1).toFixed(2), 2) + " &nbsp; "
    + gauge("root real visits", g.root_fn, g.T, Math.max(g.T, g.root_fn));
  const { pos, width, depth } = layout(st.nodes), W = 760, H = 560;
  const sx = (x) => 20 + (W - 40) * (width > 1 ? x / (width - 1) : 0.5);
  const sy = (y) => 24 + (H - 48) * (depth ? y / depth : 0);
  const path = new Set(iter >= 0 ? st.iterations[iter].path : []);
  const maxn = Math.max(1, ...st.nodes.map((n) => n.n));
  let svg = "";
  st.nodes.forEach((n) => { if (n.parent !== null) {
    const on = path.has(n.id) && path.has(n.parent) ? " onpath" : "";
    svg += `<line class="edge${on}" x1="${sx(pos[n.parent].x)}" y1="${sy(pos[n.parent].y)}" x2="${sx(pos[n.id].x)}" y2="${sy(pos[n.id].y)}"/>`;
  }});
  st.nodes.forEach((n) => {
    const r = 3 + 12 * Math.sqrt(n.n / maxn), cls = (path.has(n.id) ? " onpath" : "") + (n.id === st.committed_id ? " committed" : "");
    svg += `<g class="node${cls}"><circle cx="${sx(pos[n.id].x)}" cy="${sy(pos[n.id].y)}" r="${r}" fill="${n.n ? colour(n.q) : "#fff"}">`
      + `<title>${esc(shown(n.text))}\nn=${n.n} real visits=${n.fn} q=${n.q} prior=${n.prior}</title></circle>`
      + (width <= 24 || path.has(n.id) || n.id === st.committed_id  // labels only where they fit, or on the path
        ? `<text x="${sx(pos[n.id].x) + r + 2}" y="${sy(pos[n.id].y) + 4}">${esc(shown(n.text)).slice(0, 12)}</text>` : "")
      + "</g>";
  });
  $("tree").innerHTML = svg;
  $("iters").innerHTML = st.iterations.map((it, i) =>
    `<div data-i="${i}" class="${i === iter ? "sel" : ""}">${i + 1}. ${it.rewind ? '<span class="rewind">&#8634;</span>' : "&nbsp;&nbsp;"} `
    + `s=${it.score >= 0 ? "+" : ""}${it.score} ${esc(shown(it.text)).slice(-40)}</div>`).join("");
  document.querySelectorAll("#iters div").forEach((d) => d.onclick = () => { iter = +d.dataset.i; draw(); });
  const it = iter >= 0 ? st.iterations[iter] : null;
  $("detail").innerHTML = it ? `judged: <span class="answer">${esc(it.text)}${it.finished ? "" : " ..."}</span> `
    + `P(harmful) per label order ${it.p_harmful.join(", ")} &rarr; score ${it.score}; `
    + `siblings sharing the score (Eq. 2): ${it.similar}; candidates added: ${it.added}` : "";
}
DATA.forEach((d, i) => { const o = document.createElement("option"); o.value = i; o.textContent = d.prompt.slice(-70); $("prompt").appendChild(o); });
$("prompt").onchange = () => { s = +$("prompt").value; step = 0; iter = -1; draw(); };
$("prev").onclick = () => { if (step > 0) { step--; iter = -1; draw(); } };
$("next").onclick = () => { if (step < DATA[s].steps.length - 1) { step++; iter = -1; draw(); } };
document.onkeydown = (e) => {  // arrow keys: up/down walk the iterations, left/right the commit steps
  const keys = {ArrowLeft: "prev", ArrowRight: "next"};
  if (keys[e.key]) $(keys[e.key]).click();
  if (e.key === "ArrowUp" && iter > 0) { iter--; draw(); }
  if (e.key === "ArrowDown" && iter < DATA[s].steps[step].iterations.length - 1) { iter++; draw(); }
};
draw();
</script></body></html>
"""
