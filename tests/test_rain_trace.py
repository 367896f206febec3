"""The RAIN trace: its records agree with the search, and the page draws in a real browser."""
import json
import shutil
import subprocess

import pytest

from minialign.lab.rain_trace import SearchTrace, write_trace
from minialign.rain_cache import drive
from test_rain import make


def traced_search():
    search = make()
    search.trace = SearchTrace()
    answer = search.tok.decode(drive(search.answer()))
    return search, search.trace.finish(answer)


def test_trace_records_every_iteration_and_commit():
    search, record = traced_search()
    assert record["answer"] == "gy."
    steps = record["steps"]
    assert sum(len(s["iterations"]) for s in steps) == search.stats["iterations"]
    assert sum(it["rewind"] for s in steps for it in s["iterations"]) == search.stats["rewinds"]
    assert "".join(s["committed"] for s in steps) == "gy.\n"  # the committed sets, stop token included
    for s in steps:
        ids = {n["id"] for n in s["nodes"]}
        assert s["committed_id"] in ids and all(i in ids for it in s["iterations"] for i in it["path"])
        assert s["gauges"]["T_m"] == 6 and s["gauges"]["V"] == 0.8
    first = steps[0]["iterations"]
    assert first[0]["text"] == "" and any(it["text"] == "bx." and it["score"] == -1.0 for it in first)


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not chromium(), reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_trace_page_draws_nodes_without_script_errors(tmp_path):
    _, record = traced_search()
    html, jsonl = write_trace(str(tmp_path / "trace.html"), [record])
    assert json.loads(open(jsonl).readline())["answer"] == "gy."
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=2000", "--dump-dom", f"file://{html}"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.count("<circle") >= 3, out.stderr[-2000:]
    assert "commit step 1 of" in out.stdout
    assert "Uncaught" not in out.stderr, out.stderr[-2000:]
