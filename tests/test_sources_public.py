"""CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA and `folder`: each builds from phantoms in its
official layout, round-trips through `inspect`, keeps patients apart, and its manifest's label
counts equal counts computed here straight from the source's own CSV files."""
from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from runkit.errors import UserError
from shards import synth_sources
from shards.__main__ import main
from shards.sources import RawItem, ScanOptions, Skipped, get_source

N, SIZE = 24, 64
CHEXPERT_NIH = {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema", "Consolidation": "Consolidation",
                "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
                "Pleural Effusion": "Effusion"}


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("public")
    for name, fn in synth_sources.WRITERS.items():
        fn(root / name, N, size=SIZE, seed=3)
    return root


def build(phantoms: Path, source: str, out: Path, *extra: str) -> dict:
    assert main(["build", source, "--src", str(phantoms / source), "--out", str(out), "--size", "32",
                 "--workers", "1", "--max-count", "7", "--no-progress", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def records(out: Path) -> list[dict]:
    recs = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            recs += [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return recs


def totals(manifest: dict, group: str) -> Counter:
    out = Counter()
    for split in manifest["splits"].values():
        out.update(split["labels"].get(group, {}))
    return out


def assert_patients_apart(recs: list[dict]) -> None:
    splits = defaultdict(set)
    for r in recs:
        splits[r["patient_id"]].add(r["split"])
    assert splits and all(len(s) == 1 for s in splits.values())


def roundtrip(out: Path, capsys) -> str:
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checksums: all" in text
    return text


def read_rows(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return list(csv.DictReader(io.StringIO(raw.decode())))


def test_every_new_source_is_listed():
    from shards.__main__ import build_parser
    help_text = build_parser()._subparsers._group_actions[0].choices["build"].format_help()
    for name in ("chexpert", "mimic", "padchest", "vindr", "rsna", "folder"):
        assert name in help_text


# ----------------------------------------------------------------------------- CheXpert

@pytest.mark.parametrize("policy", ["ignore", "ones", "zeros"])
def test_chexpert_counts_follow_the_uncertain_policy(phantoms, tmp_path, capsys, policy):
    m = build(phantoms, "chexpert", tmp_path / "s", "--uncertain", policy)
    root = phantoms / "chexpert" / "CheXpert-v1.0-small"
    rows = [r for f in ("train.csv", "valid.csv") for r in read_rows(root / f) if r["Frontal/Lateral"] == "Frontal"]
    positive = {"ignore": {"1.0"}, "ones": {"1.0", "-1.0"}, "zeros": {"1.0"}}[policy]
    unknown = {"ignore": {"", "-1.0"}, "ones": {""}, "zeros": {""}}[policy]
    labels = list(rows[0])[5:]
    want = Counter(c for r in rows for c in labels if r[c] in positive)
    assert totals(m, "source_labels") == want
    assert totals(m, "source_labels_unknown") == Counter(c for r in rows for c in labels if r[c] in unknown)
    want_findings = Counter(CHEXPERT_NIH[c] for r in rows for c in CHEXPERT_NIH if r[c] in positive)
    got = totals(m, "findings")
    assert {k: v for k, v in got.items() if k not in ("No Finding", "unknown")} == want_findings
    no_nih = [r for r in rows if not any(r[c] in positive for c in CHEXPERT_NIH)]
    assert got["No Finding"] == sum(r["No Finding"] == "1.0" for r in no_nih)
    assert got["unknown"] == sum(r["No Finding"] != "1.0" for r in no_nih)
    assert m["totals"]["samples"] == len(rows)
    recs = records(tmp_path / "s")
    assert_patients_apart(recs)
    valid_patients = {r["Path"].split("/")[2] for r in read_rows(root / "valid.csv")}
    assert {r["split"] for r in recs if r["patient_id"] in valid_patients} == {"val"}
    assert all(r["split"] == "train" for r in recs if r["patient_id"] not in valid_patients)
    assert all(r["meta"]["uncertain_policy"] == policy for r in recs)
    roundtrip(tmp_path / "s", capsys)


def test_chexpert_view_filter_and_layouts(phantoms, tmp_path):
    root = phantoms / "chexpert" / "CheXpert-v1.0-small"
    rows = [r for f in ("train.csv", "valid.csv") for r in read_rows(root / f)]
    lateral = sum(r["Frontal/Lateral"] == "Lateral" for r in rows)
    assert lateral > 0
    frontal = list(get_source("chexpert").scan(phantoms / "chexpert"))  # the folder above CheXpert-v1.0-small
    same = list(get_source("chexpert").scan(root))                      # or the data-set folder itself
    assert [i.record.key for i in frontal] == [i.record.key for i in same]
    assert len(frontal) == len(rows) - lateral
    everything = [i for i in get_source("chexpert").scan(root, ScanOptions(views="all")) if isinstance(i, RawItem)]
    assert len(everything) == len(rows)
    assert {i.record.view for i in everything} >= {"LATERAL", "AP"}


def test_chexpert_bad_inputs(phantoms, tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    src = phantoms / "chexpert" / "CheXpert-v1.0-small"
    (root / "train.csv").write_text((src / "train.csv").read_text().replace("Frontal/Lateral", "Orientation", 1))
    with pytest.raises(UserError, match="Frontal/Lateral"):
        list(get_source("chexpert").scan(root))
    text = (src / "train.csv").read_text().splitlines()
    bad = text[1].split(",")
    bad[6] = "2.0"  # not 1 / 0 / -1 / blank
    (root / "train.csv").write_text("\n".join([text[0], ",".join(bad), text[2]]) + "\n")
    out = list(get_source("chexpert").scan(root, ScanOptions(views="all")))
    reasons = [o.reason for o in out if isinstance(o, Skipped)]
    assert any("bad label value" in r for r in reasons) and "missing file" in reasons  # train/ not copied
    with pytest.raises(UserError, match="uncertain"):
        ScanOptions(uncertain="maybe")


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

@pytest.mark.parametrize("labeler", ["chexpert", "negbio"])
def test_mimic_official_split_and_labels(phantoms, tmp_path, capsys, labeler):
    m = build(phantoms, "mimic", tmp_path / "s", "--labeler", labeler)
    src = phantoms / "mimic"
    meta = [r for r in read_rows(src / "mimic-cxr-2.0.0-metadata.csv.gz") if r["ViewPosition"] in ("PA", "AP")]
    labels = {(r["subject_id"], r["study_id"]): r for r in read_rows(src / f"mimic-cxr-2.0.0-{labeler}.csv.gz")}
    split = {r["dicom_id"]: r["split"] for r in read_rows(src / "mimic-cxr-2.0.0-split.csv.gz")}
    names = [c for c in next(iter(labels.values())) if c not in ("subject_id", "study_id")]
    want = Counter(c for r in meta for c in names
                   if labels.get((r["subject_id"], r["study_id"]), {}).get(c) == "1.0")
    assert totals(m, "source_labels") == want
    unlabelled = sum((r["subject_id"], r["study_id"]) not in labels for r in meta)
    rows = [labels[(r["subject_id"], r["study_id"])] for r in meta if (r["subject_id"], r["study_id"]) in labels]
    no_nih = [r for r in rows if not any(r[c] == "1.0" for c in CHEXPERT_NIH)]
    assert totals(m, "findings")["unknown"] == unlabelled + sum(r["No Finding"] != "1.0" for r in no_nih)
    assert totals(m, "findings")["No Finding"] == sum(r["No Finding"] == "1.0" for r in no_nih)
    if labeler == "chexpert":
        assert unlabelled > 0  # the phantom chexpert file leaves one study out, as real studies can be
    recs = records(tmp_path / "s")
    assert len(recs) == len(meta)
    assert_patients_apart(recs)
    to_ours = {"train": "train", "validate": "val", "test": "test"}
    for r in recs:
        assert r["split"] == to_ours[split[r["key"].removeprefix("mimic_")]]
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    roundtrip(tmp_path / "s", capsys)


def test_mimic_missing_label_file_is_a_clear_error(phantoms, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in ("metadata", "split"):
        (src / f"mimic-cxr-2.0.0-{f}.csv.gz").write_bytes((phantoms / "mimic" / f"mimic-cxr-2.0.0-{f}.csv.gz").read_bytes())
    with pytest.raises(UserError, match="mimic-cxr-2.0.0-chexpert.csv"):
        list(get_source("mimic").scan(src))


# ----------------------------------------------------------------------------- PadChest

def test_padchest_labels_views_and_16bit_windowing(phantoms, tmp_path, capsys):
    m = build(phantoms, "padchest", tmp_path / "s")
    src = phantoms / "padchest"
    rows = [r for r in read_rows(src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
            if r["Projection"] in ("PA", "AP", "AP_horizontal")]
    want = Counter(x.strip() for r in rows for x in set(ast.literal_eval(r["Labels"])))
    assert totals(m, "source_labels") == want
    assert totals(m, "diagnosis")["normal"] == sum([x.strip() for x in ast.literal_eval(r["Labels"])] == ["normal"]
                                                        for r in rows)
    recs = records(tmp_path / "s")
    assert len(recs) == len(rows)
    assert_patients_apart(recs)
    windowed = [r for r in recs if "window" in r["meta"]]
    assert windowed and len(windowed) < len(recs)
    assert all(r["meta"]["preprocess"]["orig_mode"].startswith("I;16") for r in recs)
    roundtrip(tmp_path / "s", capsys)


def test_padchest_16bit_pngs_are_windowed_not_truncated(phantoms, tmp_path):
    from shards.preprocess import decode_and_preprocess
    img = np.tile(np.rint(np.linspace(0, 255, 64)).astype(np.uint8), (64, 1))
    for windowed in (False, True):
        data, window = synth_sources.padchest_png(img, windowed)
        out, _ = decode_and_preprocess(data, size=64, window=window)
        assert np.abs(out.astype(int) - img).max() <= 1   # the low byte alone would wrap around 16 times
        assert out.max() >= 250 and out.min() <= 2


# ----------------------------------------------------------------------------- VinDr-CXR and RSNA (DICOM)

def test_vindr_builds_from_dicom_with_votes_and_meta(phantoms, tmp_path, capsys):
    m = build(phantoms, "vindr", tmp_path / "s")
    rows = read_rows(phantoms / "vindr" / "train.csv")
    classes = defaultdict(set)
    for r in rows:
        classes[r["image_id"]].add(r["class_name"])
    want = Counter()
    for c in classes.values():
        want.update(c - {"No finding"} or {"No finding"})
    assert totals(m, "source_labels") == want
    assert totals(m, "diagnosis")["normal"] == sum(c == {"No finding"} for c in classes.values())
    recs = records(tmp_path / "s")
    assert len(recs) == len(classes) and m["totals"]["skipped"] == 0
    assert all(r["meta"]["pixel_spacing"] == [0.14, 0.14] and r["view"] == "PA" for r in recs)
    syntaxes = Counter(r["meta"]["preprocess"]["transfer_syntax"] for r in recs)
    assert "RLE Lossless" in syntaxes and len(syntaxes) >= 2
    assert {r["meta"]["preprocess"]["photometric"] for r in recs} == {"MONOCHROME1", "MONOCHROME2"}
    assert_patients_apart(recs)
    roundtrip(tmp_path / "s", capsys)


def test_rsna_targets_classes_and_broken_files(phantoms, tmp_path, capsys):
    src = tmp_path / "rsna"
    import shutil
    shutil.copytree(phantoms / "rsna", src)
    victims = sorted((src / "stage_2_train_images").iterdir())[:3]
    victims[0].write_bytes(victims[0].read_bytes()[:-100])       # truncated inside the pixel data
    victims[1].write_bytes(victims[1].read_bytes()[:400])        # truncated before the pixel data
    victims[2].write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)  # a preamble and nothing valid
    assert main(["build", "rsna", "--src", str(src), "--out", str(tmp_path / "s"), "--size", "32",
                 "--workers", "1", "--no-progress"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    reasons = [s["reason"] for s in m["skipped"]]
    assert sorted(reasons) == ["corrupt dicom pixel data (ValueError)", "dicom without pixel data",
                               "dicom without pixel data"], reasons
    labels = read_rows(src / "stage_2_train_labels.csv")
    cls = {r["patientId"]: r["class"] for r in read_rows(src / "stage_2_detailed_class_info.csv")}
    target = {r["patientId"] for r in labels if r["Target"] == "1"}
    broken = {v.stem for v in victims}
    alive = [p for p in cls if p not in broken]
    assert totals(m, "diagnosis")["pneumonia"] == sum(p in target for p in alive)
    assert totals(m, "source_labels") == Counter(cls[p] for p in alive)
    recs = records(tmp_path / "s")
    assert {r["view"] for r in recs} == {"AP", "PA"}  # from the DICOM ViewPosition
    roundtrip(tmp_path / "s", capsys)


# ----------------------------------------------------------------------------- folder

def test_folder_tree_with_optional_labels(phantoms, tmp_path, capsys):
    m = build(phantoms, "folder", tmp_path / "s")
    labelled = read_rows(phantoms / "folder" / "labels.csv")
    assert m["totals"]["samples"] == N
    d = totals(m, "diagnosis")
    assert d["unknown"] == N - len(labelled)
    assert d["normal"] == sum(r["diagnosis"] == "normal" for r in labelled)
    recs = records(tmp_path / "s")
    assert {r["meta"]["preprocess"]["orig_format"] for r in recs} == {"PNG", "JPEG", "DICOM"}
    assert_patients_apart(recs)
    roundtrip(tmp_path / "s", capsys)


def test_folder_csv_errors_are_skips(tmp_path):
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.png").write_bytes(synth_sources.encode_png(np.zeros((8, 8), np.uint8)))
    (src / "labels.csv").write_text("path,diagnosis,findings\na/x.png,flu,\nb/gone.png,normal,\n../etc.png,,\n")
    out = list(get_source("folder").scan(src))
    assert sorted((o.name, o.reason) for o in out if isinstance(o, Skipped)) == [
        ("../etc.png", "unsafe path (..)"), ("a/x.png", "unknown diagnosis 'flu'"), ("b/gone.png", "missing file")]


def test_padchest_label_lists_are_parsed_without_running_code():
    from shards.sources.padchest import parse_labels, parse_window
    assert parse_labels("['normal']") == ["normal"]
    assert parse_labels("[' pneumonia', 'infiltrates', 'pneumonia']") == ["infiltrates", "pneumonia"]
    assert parse_labels("") == [] and parse_labels("nan") == []
    for bad in ("__import__('os').system('true')", "['a', 3]", "[unclosed", "{'a': 1}"):
        assert parse_labels(bad) is None
    assert parse_window("2048", "4096") == [2048.0, 4096.0] and parse_window("['1000', '1200']", "[800, 900]") == [1000.0, 800.0]
    assert parse_window("None", "None") is None and parse_window("100", "0") is None


def test_padchest_bad_rows_are_skips(phantoms, tmp_path):
    src = tmp_path / "pc"
    import shutil
    shutil.copytree(phantoms / "padchest", src)
    csv_path = src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    header, first, second = rows[0], rows[1], rows[2]
    first[header.index("Labels")] = "['normal'"
    first[header.index("Projection")] = second[header.index("Projection")] = "PA"
    second[header.index("ImageDir")] = ".."
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, first, second])
    csv_path.write_text(buf.getvalue())
    out = list(get_source("padchest").scan(src))
    assert sorted(o.reason for o in out if isinstance(o, Skipped)) == ["unparseable Labels list", "unsafe file name"]


def test_new_phantoms_are_byte_identical_for_one_seed(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    for run in ("x", "y"):
        for name, fn in synth_sources.WRITERS.items():
            fn(tmp_path / run / name, 6, size=32, seed=5)
    x, y = files(tmp_path / "x"), files(tmp_path / "y")
    assert x.keys() == y.keys() and all(x[k] == y[k] for k in x)
    assert any(k.endswith(".dicom") for k in x) and any(k.endswith(".csv.gz") for k in x)


def test_dicom_laterals_are_dropped_unless_all_views(tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    img = np.full((32, 32), 100, np.uint8)
    img[8:24, 8:24] = 200
    (src / "front.dcm").write_bytes(synth_sources.dicom_variant(img, "mono2-8bit", "f", view="PA"))
    (src / "side.dcm").write_bytes(synth_sources.dicom_variant(img, "mono2-8bit", "s", view="LL"))
    for views, kept in (("frontal", 1), ("all", 2)):
        out = tmp_path / views
        assert main(["build", "folder", "--src", str(src), "--out", str(out), "--size", "16", "--workers", "1",
                     "--no-progress", "--views", views]) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["totals"]["samples"] == kept
        assert [s["reason"] for s in m["skipped"]] == (["non-frontal view: LL"] if kept == 1 else [])
