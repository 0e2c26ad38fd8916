"""The demo pipeline in miniature (`--preset tiny`): every stage hands the next what it needs.

Learning is not asserted here (a few steps on a few dozen phantoms); `make demo` and its REPORT.md are
where the learning checks live. This test catches breaks between the stages, and checks that a second
run reuses the finished stages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runkit.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
STAGES = ["synth", "build", "pretrain", "diagnosis", "severity", "sweep"]

pytestmark = pytest.mark.slow


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "RAY_ACCEPT_CLUSTER_SCOPED_CONTEXT": "1"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "launch/demo.py", "--preset", "tiny", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_tiny_demo_runs_every_stage_then_reuses_them(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    state = json.loads((out / "stages.json").read_text())
    assert list(state) == STAGES and all(s["done"] for s in state.values())
    for i, name in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {name}" in r.stdout

    # what each stage handed on
    assert (out / "pretrain" / "encoder.pt").stat().st_size > 0
    assert list((out / "pretrain" / "samples").glob("step_*.png"))
    assert json.loads((out / "sweep" / "best.json").read_text())
    report = (out / "REPORT.md").read_text()
    for section in ("Phantom", "Reconstruction", "Loss", "Diagnosis", "Score-CAM", "Severity", "Sweep",
                    "Timing", "Learning checks"):
        assert section.lower() in report.lower(), section
    for rel in _images(report):  # every image the report shows exists
        assert (out / rel).is_file(), rel
    assert "mean predictor" in report and "ssl" in report and "scratch" in report
    # the online probes, drawn against the random-init encoder (step 0) and judged against it
    assert "report/probes.png" in _images(report) and "random-init (step 0) value" in report
    probes = [r for r in read_jsonl(out / "pretrain" / "metrics.jsonl") if "probe/multiscale/diagnosis_auroc" in r]
    assert [r["step"] for r in probes] == [0, 3, 6] and "probe_ref/multiscale/diagnosis_auroc" in probes[-1]
    assert list(out.glob("**/wandb/offline-run-*")), "no offline W&B run folders"

    # a second run reuses every stage and rewrites the report
    r2 = _demo(out)
    assert r2.returncode == 0, r2.stdout[-4000:] + r2.stderr[-4000:]
    assert r2.stdout.count("reusing the finished stage") == len(STAGES)
    assert (out / "REPORT.md").read_text().count("## ") == report.count("## ")


def _images(markdown: str) -> list[str]:
    import re

    return re.findall(r'<img src="([^"]+)"', markdown) + re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
