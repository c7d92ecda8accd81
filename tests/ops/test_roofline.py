"""scripts/roofline.py: the committed docs/roofline.json is what the code models today, `auto` on CUDA is the
modelled-best path (until a GPU measurement exists), and it meets the issue's budget against TRL's chunked head."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edpo_plugin.ops import AUTO_ON_CUDA, IMPLS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = json.loads(open(os.path.join(REPO, "docs", "roofline.json")).read())
OWN = [p for p in IMPLS if p != "auto"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline") / "r.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "roofline.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _row(rows, gpu, path, head):
    return next(r for r in rows if (r["gpu"], r["path"], r["head"]) == (gpu, path, head))


def test_committed_rows_are_what_the_code_models(fresh):
    for r in fresh:
        if r["path"] in OWN + ["auto"]:
            assert _row(COMMITTED["rows"], r["gpu"], r["path"], r["head"]) == r


def test_auto_on_cuda_is_the_modelled_best_path():
    measured = os.path.join(REPO, "docs", "bench_head_gpu.json")
    if os.path.exists(measured):  # a GPU measurement replaces the model
        rows = [r for r in json.loads(open(measured).read())["rows"] if r["head"] == "frozen" and r["impl"] in OWN]
        assert AUTO_ON_CUDA == min(rows, key=lambda r: r["time_s"])["impl"]
        return
    for gpu in ("H100", "A100"):
        for head in ("frozen", "trainable"):
            best = min(OWN, key=lambda p: _row(COMMITTED["rows"], gpu, p, head)["ms"])
            assert _row(COMMITTED["rows"], gpu, AUTO_ON_CUDA, head)["ms"] == _row(COMMITTED["rows"], gpu, best,
                                                                                  head)["ms"]  # fmt: skip
            assert _row(COMMITTED["rows"], gpu, "auto", head) == {**_row(COMMITTED["rows"], gpu, AUTO_ON_CUDA,
                                                                        head), "path": "auto"}  # fmt: skip


def test_auto_meets_the_budget_and_trl_chunked_head_on_h100():
    auto = {h: _row(COMMITTED["rows"], "H100", "auto", h)["ms"] for h in ("frozen", "trainable")}
    assert auto["frozen"] <= 45 and auto["trainable"] <= 75
    for head in ("frozen", "trainable"):
        assert auto[head] <= _row(COMMITTED["rows"], "H100", "trl-chunked-dpo", head)["ms"]
