"""Cross-source duplicates: phantoms planted by `synth --duplicates` are found by pixel hash at build
time, reported by `python -m shards dedupe`, and `build --dedupe-against` keeps one copy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.__main__ import main

K = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dedupe")
    raw = root / "raw"
    assert main(["synth", "--out", str(raw), "--n-nih", "8", "--n-covid", "0", "--size", "64", "--n-folder", "6",
                 "--n-rsna", "6", "--duplicates", str(K)]) == 0
    out = {}
    for name in ("nih", "folder", "rsna"):
        out[name] = root / name
        assert main(["build", name, "--src", str(raw / name), "--out", str(out[name]), "--size", "32",
                     "--workers", "1", "--no-progress"]) == 0
    out["raw"] = raw
    return out


def test_planted_duplicates_are_found_across_sources(built, tmp_path, capsys):
    truth = json.loads((built["raw"] / "truth" / "duplicates.json").read_text())
    report = tmp_path / "dups.json"
    capsys.readouterr()
    assert main(["dedupe", str(built["nih"]), str(built["folder"]), str(built["rsna"]), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    groups = json.loads(report.read_text())["groups"]
    assert len(groups) == K and json.loads(report.read_text())["cross_folder_groups"] == K, text
    for g in groups:
        folders = sorted(Path(m["folder"]).name for m in g)
        assert folders == ["folder", "nih", "rsna"]       # the PNG copy and the DICOM copy of one NIH image
    nih_keys = sorted(m["key"] for g in groups for m in g if Path(m["folder"]).name == "nih")
    assert nih_keys == sorted("nih_" + Path(n).stem for n in truth["nih_images"])
    assert f"{K} duplicate groups" in text


def test_dedupe_against_keeps_one_copy(built, tmp_path):
    out = tmp_path / "rsna-deduped"
    assert main(["build", "rsna", "--src", str(built["raw"] / "rsna"), "--out", str(out), "--size", "32",
                 "--workers", "1", "--no-progress", "--dedupe-against", str(built["nih"])]) == 0
    m = json.loads((out / "manifest.json").read_text())
    dup = [s for s in m["skipped"] if s["reason"].startswith("duplicate: same pixels as nih/nih_")]
    assert len(dup) == K and m["skipped_by_reason"] == {"duplicate": K}
    before = json.loads((built["rsna"] / "manifest.json").read_text())["totals"]["samples"]
    assert m["totals"]["samples"] == before - K
    assert m["options"]["dedupe_against"][0][0] == "nih"


def test_duplicates_inside_one_source_are_counted(built):
    for name in ("nih", "folder"):
        assert json.loads((built[name] / "manifest.json").read_text())["duplicates"]["groups"] == 0
    lines = (built["folder"] / "pixel-hashes.tsv").read_text().splitlines()
    assert len(lines) == json.loads((built["folder"] / "manifest.json").read_text())["totals"]["samples"]


def test_dedupe_needs_hash_lists(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dedupe", str(tmp_path)])
    assert exc.value.code == 2
