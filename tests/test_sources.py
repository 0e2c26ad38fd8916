"""Every raw source: the real data in ../shared/data, hand-made fixtures in each on-disk layout, and
phantoms from shards.synth; CSV quirks, required columns, missing files and patient-disjoint splits."""
from __future__ import annotations

import csv
import io
import pickle
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runkit.errors import UserError
from shards.sources import SOURCE_NAMES, RawItem, Skipped, diagnosis_from_finding, get_source
from shards.splits import nih_val_target

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
LABELS = ["No Finding", "Pneumonia", "Effusion|Pneumonia", "Mass|Nodule", "Atelectasis", "No Finding"]


def scan(name: str, src: Path) -> tuple[list[RawItem], list[Skipped]]:
    out = list(get_source(name).scan(src))
    items = [o for o in out if isinstance(o, RawItem)]
    skipped = [o for o in out if isinstance(o, Skipped)]
    assert out == skipped + items, "Skipped entries come first, then items"
    keys = [it.record.key for it in items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) and not any("." in k for k in keys)
    return items, skipped


def assert_patient_disjoint(items: list[RawItem]) -> dict[str, set[str]]:
    splits_of = defaultdict(set)
    for it in items:
        splits_of[it.record.patient_id].add(it.record.split)
    assert all(len(s) == 1 for s in splits_of.values()), {p: s for p, s in splits_of.items() if len(s) > 1}
    return splits_of


def png(seed: int, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- NIH (hand-made)

def nih_rows(n_patients: int = 30) -> list[list[str]]:
    rows, k = [], 0
    for pid in range(1, n_patients + 1):
        for follow in range(1 + pid % 4):
            rows.append([f"{pid:08d}_{follow:03d}.png", LABELS[k % len(LABELS)], str(follow), str(pid),
                         str(20 + pid), "MF"[pid % 2], "PA" if k % 3 else "AP", "2500", "2048", "0.143", "0.143"])
            k += 1
    return rows


def write_nih(root: Path, layout: str = "flat", variant: str = "v2020", rows=None) -> list[list[str]]:
    """The NIH format: CSV, official split lists, images in one of the three layouts."""
    rows = rows if rows is not None else nih_rows()
    root.mkdir(parents=True, exist_ok=True)
    name = "Data_Entry_2017_v2020.csv" if variant == "v2020" else "Data_Entry_2017.csv"
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f)
        if variant == "v2020":
            w.writerow(NIH_HEADER)
            w.writerows(rows)
        else:  # the 2017 file: a trailing empty column, ages like 058Y
            w.writerow(NIH_HEADER + [""])
            w.writerows([r[:4] + [f"{int(r[4]):03d}Y"] + r[5:] + [""] for r in rows])
    test = [r[0] for r in rows if r[3].isdigit() and int(r[3]) % 5 == 0]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[0] not in test) + "\n")
    names = [r[0] for r in rows]
    chunks = [names[: len(names) // 2], names[len(names) // 2:]]
    for i, chunk in enumerate(chunks, start=1):
        if layout == "flat":
            folder = root / "images"
        elif layout == "kaggle":
            folder = root / f"images_{i:03d}" / "images"
        else:
            folder = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for n in chunk:
                (folder / n).write_bytes(png(names.index(n)))
        else:
            with tarfile.open(root / f"images_{i:03d}.tar.gz", "w:gz") as tf:
                for n in chunk:
                    data = png(names.index(n))
                    info = tarfile.TarInfo(f"images/{n}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return rows


@pytest.fixture(scope="module")
def nih_layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("nih")
    out = {}
    for layout in ("flat", "kaggle", "tar"):
        write_nih(base / layout, layout)
        out[layout] = base / layout
    return out


def test_nih_three_layouts_give_the_same_records(nih_layouts):
    results = {layout: scan("nih", src) for layout, src in nih_layouts.items()}
    n = len(nih_rows())
    signature = None
    for layout, (items, skipped) in results.items():
        assert len(items) == n and skipped == []
        sig = [(it.record.key, it.record.split, it.record.patient_id, it.record.diagnosis, it.record.findings)
               for it in items]
        signature = signature or sig
        assert sig == signature, layout
    flat, tar = results["flat"][0], results["tar"][0]
    assert [it.read() for it in flat] == [it.read() for it in tar]
    assert tar[0].record.meta["path"].endswith("images_001.tar.gz:images/00000001_000.png")
    assert flat[0].record.meta["path"].endswith("images/00000001_000.png")
    assert Path(results["kaggle"][0][0].record.meta["path"]).parent.parent.name == "images_001"
    for it in (flat[0], tar[-1]):  # the writer sends `read` to worker processes
        assert pickle.loads(pickle.dumps(it.read))() == it.read()


def test_nih_labels_meta_and_splits(nih_layouts):
    items, _ = scan("nih", nih_layouts["flat"])
    by_key = {it.record.key: it.record for it in items}
    r = by_key["nih_00000002_000"]
    assert r.source == "nih" and r.patient_id == "2" and r.image is None
    assert r.findings == ["Effusion", "Pneumonia"] and r.diagnosis == "pneumonia"
    assert r.meta["age"] == 22 and r.meta["sex"] == "M" and r.meta["csv_size"] == [2500, 2048]
    assert by_key["nih_00000001_000"].findings == [] and by_key["nih_00000001_000"].diagnosis == "normal"
    assert Counter(it.record.diagnosis for it in items).keys() == {"normal", "pneumonia", "other"}

    test_names = set((nih_layouts["flat"] / "test_list.txt").read_text().split())
    for it in items:
        name = Path(it.record.meta["path"]).name
        assert (it.record.split == "test") == (name in test_names)
    splits_of = assert_patient_disjoint(items)
    n_train_val = sum(1 for it in items if it.record.split != "test")
    assert sum(1 for it in items if it.record.split == "val") == nih_val_target(n_train_val)
    assert {s for ss in splits_of.values() for s in ss} == {"train", "val", "test"}


def test_nih_2017_csv_variant(tmp_path, nih_layouts):
    write_nih(tmp_path, "flat", variant="2017")
    old, _ = scan("nih", tmp_path)
    new, _ = scan("nih", nih_layouts["flat"])
    assert [it.record.to_json() | {"meta": None} for it in old] == [it.record.to_json() | {"meta": None} for it in new]
    assert old[0].record.meta["age"] == new[0].record.meta["age"] == 21  # "021Y" -> 21


def test_nih_split_does_not_depend_on_present_files(tmp_path, nih_layouts):
    write_nih(tmp_path, "flat")
    gone = sorted((tmp_path / "images").iterdir())[::3]
    for p in gone:
        p.unlink()
    items, skipped = scan("nih", tmp_path)
    assert sorted(s.name for s in skipped) == sorted(p.name for p in gone)
    assert {s.reason for s in skipped} == {"missing file"}
    full = {it.record.key: it.record.split for it in scan("nih", nih_layouts["flat"])[0]}
    assert all(full[it.record.key] == it.record.split for it in items)


def test_nih_bad_rows_are_skipped_with_reasons(tmp_path):
    rows = nih_rows(10)
    rows[1][3] = ""                      # no patient id
    rows[2][1] = "Pneumonia|Covfefe"     # not an NIH-14 label
    rows.append(list(rows[0]))           # duplicate row
    write_nih(tmp_path, "flat", rows=rows)
    with open(tmp_path / "Data_Entry_2017_v2020.csv", "a", newline="") as f:
        csv.writer(f).writerow(["99999999_000.png", "No Finding", "0", "999", "50", "F", "PA", "1", "1", "1", "1"])
    (tmp_path / "images" / "99999999_000.png").write_bytes(png(0))
    items, skipped = scan("nih", tmp_path)
    reasons = {s.name: s.reason for s in skipped}
    assert reasons[rows[1][0]] == "csv row missing fields: Patient ID"
    assert reasons[rows[2][0]] == "unknown finding: Covfefe"
    assert reasons[rows[0][0]] == "duplicate csv row"
    assert reasons["99999999_000.png"].startswith("in neither")
    assert len(items) == len(rows) - 1 - 2  # the duplicate and the two bad rows


def test_nih_user_errors(tmp_path):
    with pytest.raises(UserError, match="source folder not found"):
        get_source("nih").scan(tmp_path / "nope")
    with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv"):
        get_source("nih").scan(tmp_path)
    write_nih(tmp_path, "flat", rows=nih_rows(3))
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(UserError, match="test_list.txt"):
        get_source("nih").scan(tmp_path)
    (tmp_path / "test_list.txt").write_text("")
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels,Age\nx.png,No Finding,3\n")
    with pytest.raises(UserError, match="lacks required column.*Patient ID"):
        get_source("nih").scan(tmp_path)  # raised at call time, before any iteration


# ----------------------------------------------------------------------------- NIH (phantoms)

def test_nih_phantoms_in_every_layout(tmp_path):
    from shards import synth
    src = tmp_path / "flat"
    synth.synth_nih(src, 24, size=64, seed=3)
    items, skipped = scan("nih", src)
    assert len(items) == 24 and skipped == []
    assert_patient_disjoint(items)
    assert {it.record.split for it in items} == {"train", "val", "test"}
    for it in items:  # labels are true by construction: compare with the generator's ground truth
        _, truth = synth.load_truth(src, Path(it.record.meta["path"]).name)
        assert it.record.findings == sorted(truth["findings"])
        assert it.record.patient_id == str(truth["patient"])
    # rebuild the same images as Kaggle subfolders and as official tar.gz archives
    files = sorted(p for p in src.rglob("*.png"))
    for layout in ("kaggle", "tar"):
        dst = tmp_path / layout
        dst.mkdir()
        for meta in src.iterdir():
            if meta.is_file():
                shutil.copy(meta, dst / meta.name)
        if layout == "kaggle":
            for i, p in enumerate(files):
                folder = dst / f"images_{1 + i % 2:03d}" / "images"
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, folder / p.name)
        else:
            with tarfile.open(dst / "images_001.tar.gz", "w:gz") as tf:
                for p in files:
                    tf.add(p, arcname=f"images/{p.name}")
        other, other_skipped = scan("nih", dst)
        assert other_skipped == []
        assert [it.record.to_json() | {"meta": None} for it in other] == \
               [it.record.to_json() | {"meta": None} for it in items]
        assert [it.read() for it in other] == [it.read() for it in items]


# ----------------------------------------------------------------------------- COVID sources, real data

@pytest.mark.real
def test_covid_chestxray_real(shared_data):
    items, skipped = scan("covid-chestxray", shared_data / "covid-chestxray-dataset")
    assert len(items) == 527
    assert len(skipped) == 11 and {s.reason for s in skipped} == {"missing file"}
    images = shared_data / "covid-chestxray-dataset" / "images"
    assert all(not (images / s.name).exists() for s in skipped)
    assert {Path(it.record.meta["path"]).name for it in items} == {p.name for p in images.iterdir()}
    assert {it.record.view for it in items} <= {"PA", "AP", "AP Supine"}
    dx = Counter(it.record.diagnosis for it in items)
    assert dx["covid"] == 427 and dx["normal"] == 19  # 415 COVID-19 + 12 "COVID-19, ARDS"; No Finding
    assert dx["pneumonia"] > 70 and dx["other"] >= 4
    # the same files listed under patients 285 and 339 are one image in one patient group
    dup = next(it.record for it in items if it.record.meta["path"].endswith("/000001-24.jpg"))
    assert dup.meta["patient_ids"] == ["285", "339"] and dup.patient_id == "285"
    assert_patient_disjoint(items)
    assert all(it.record.severity is None for it in items)  # the severity CSV is not shipped here


@pytest.mark.real
def test_actualmed_real(shared_data):
    items, skipped = scan("actualmed", shared_data / "actualmed-covid-chestxray")
    assert len(items) == 54 and len(skipped) == 184
    assert {s.reason for s in skipped} == {"missing file"}
    assert Counter(it.record.diagnosis for it in items) == {"covid": 26, "normal": 18, None: 10}
    assert_patient_disjoint(items)


@pytest.mark.real
def test_figure1_real(shared_data):
    items, skipped = scan("figure1", shared_data / "figure1-covid-chestxray")
    assert len(items) == 55 and skipped == []
    assert Counter(it.record.diagnosis for it in items) == {"covid": 35, None: 15, "normal": 3, "pneumonia": 2}
    by_image = {Path(it.record.meta["path"]).stem: it.record for it in items}
    assert by_image["COVID-00003a"].patient_id == by_image["COVID-00003b"].patient_id == "COVID-00003"
    assert Path(by_image["COVID-00015a"].meta["path"]).suffix == ".png"
    assert_patient_disjoint(items)


# ----------------------------------------------------------------------------- COVID sources, fixtures

COVID_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "folder", "filename"]


def write_covid(root: Path, rows: list[dict], severity: list[str] | None = None, files=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COVID_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COVID_COLUMNS})
    for i, r in enumerate(rows):
        if (files is None or r.get("filename") in files) and r.get("filename"):
            (root / "images" / r["filename"]).write_bytes(png(i))
    if severity is not None:
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / "covid-severity-scores.csv").write_text("\n".join(severity) + "\n")


def test_covid_chestxray_filtering_severity_and_hierarchical_findings(tmp_path):
    rows = [
        {"patientid": "1", "finding": "Pneumonia/Viral/COVID-19", "view": "PA", "modality": "X-ray", "filename": "a.png"},
        {"patientid": "1", "finding": "Pneumonia/Viral/COVID-19", "view": "L", "modality": "X-ray", "filename": "b.png"},
        {"patientid": "2", "finding": "Pneumonia/Bacterial/Streptococcus", "view": "AP Supine", "modality": "X-ray",
         "filename": "c.png"},
        {"patientid": "3", "finding": "No Finding", "view": "AP  semi erect", "modality": "X-ray", "filename": "d.png"},
        {"patientid": "4", "finding": "todo", "view": "Axial", "modality": "CT", "filename": "e.png"},
        {"patientid": "5", "finding": "Tuberculosis", "view": "AP erect", "modality": "X-ray", "filename": "f.png"},
        {"patientid": "", "finding": "COVID-19", "view": "PA", "modality": "X-ray", "filename": "g.png"},
        {"patientid": "7", "finding": "Unknown", "view": "PA", "modality": "X-ray", "filename": "gone.png"},
        {"patientid": "8", "finding": "COVID-19", "view": "PA", "modality": "X-ray", "filename": "../../etc/x.png"},
        {"patientid": "9", "finding": "COVID-19", "view": "", "modality": "X-ray", "filename": "h.png"},
        {"patientid": "9", "finding": "COVID-19", "view": "", "modality": "CT", "filename": "i.png"},
    ]
    severity = ["## Cohen et al. severity scores", "## mean of three raters", "filename,geographic_mean,opacity_mean",
                "a.png,5.5,3.25", "c.png,9.0,2.0", "d.png,n/a,1"]
    write_covid(tmp_path, rows, severity, files={"a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"})
    items, skipped = scan("covid-chestxray", tmp_path)
    recs = {Path(it.record.meta["path"]).name: it.record for it in items}
    assert set(recs) == {"a.png", "c.png", "d.png", "f.png"}  # lateral and CT rows are not inputs
    assert {s.name: s.reason for s in skipped} == {
        "g.png": "csv row missing fields: patientid", "gone.png": "missing file",
        "../../etc/x.png": "unsafe file name", "h.png": "csv row missing fields: view"}
    assert recs["a.png"].diagnosis == "covid" and recs["a.png"].severity == {"geographic_mean": 5.5, "opacity_mean": 3.25}
    assert recs["c.png"].diagnosis == "pneumonia" and recs["c.png"].severity is None  # 9 > 8: not trusted
    assert recs["d.png"].diagnosis == "normal" and recs["d.png"].severity is None
    assert recs["f.png"].diagnosis == "other"


def test_covid_chestxray_required_columns(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,finding,view,filename\n1,COVID-19,PA,a.png\n")
    with pytest.raises(UserError, match="lacks required column.*modality"):
        get_source("covid-chestxray").scan(tmp_path)
    with pytest.raises(UserError, match="CSV not found"):
        get_source("actualmed").scan(tmp_path / "..")


def test_covid_chestxray_phantoms(tmp_path):
    from shards import synth
    src = tmp_path / "covid-chestxray"
    synth.synth_covid(src, 30, size=64, seed=1)
    items, skipped = scan("covid-chestxray", src)
    assert len(items) == 30 and skipped == []
    assert_patient_disjoint(items)
    scored = 0
    for it in items:
        _, truth = synth.load_truth(src, Path(it.record.meta["path"]).name)
        assert it.record.diagnosis == truth["diagnosis"]
        if it.record.severity is not None:  # joined from annotations/covid-severity-scores.csv
            scored += 1
            assert it.record.severity == pytest.approx(
                {k: truth["severity"][k] for k in ("geographic_mean", "opacity_mean")})
    assert scored >= 10


def test_actualmed_and_figure1_layouts(tmp_path):
    am = tmp_path / "actualmed"
    (am / "images").mkdir(parents=True)
    am_rows = "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,imagename,notes\n" \
              "ANON1,,M,50,COVID-19,,,,PA,X-ray,CR.1.2.3.png,\nANON1,,M,50,COVID-19,,,,AP,X-ray,CR.1.2.4.png,\n" \
              "ANON2,,F,,,,,,PA,X-ray,CR.9.png,Inconclusive\nANON3,,F,,No finding,,,,L,X-ray,CR.10.png,\n"
    (am / "metadata.csv").write_text(am_rows)
    for n in ("CR.1.2.3.png", "CR.9.png", "CR.10.png"):
        (am / "images" / n).write_bytes(png(1))
    items, skipped = scan("actualmed", am)
    assert [it.record.key for it in items] == ["actualmed_CR_1_2_3", "actualmed_CR_9"]
    assert [it.record.diagnosis for it in items] == ["covid", None]
    assert skipped == [Skipped("CR.1.2.4.png", "missing file")]

    f1 = tmp_path / "figure1"
    (f1 / "images").mkdir(parents=True)
    text = "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,notes\n" \
           "COVID-00001,1,M,33,COVID-19,,,,,X-ray,Fi\xe8vre\nCOVID-00002a,,F,,Pneumonia,,,,AP erect,X-ray,\n" \
           "COVID-00002b,,F,,Pneumonia,,,,AP,X-ray,\nCOVID-00009,,F,,,,,,PA,X-ray,\n"
    (f1 / "metadata.csv").write_bytes(text.encode("latin-1"))  # not valid UTF-8, as upstream
    (f1 / "images" / "COVID-00001.jpg").write_bytes(png(2))
    (f1 / "images" / "COVID-00002a.png").write_bytes(png(3))
    (f1 / "images" / "COVID-00002b.jpeg").write_bytes(png(4))
    items, skipped = scan("figure1", f1)
    assert [Path(it.record.meta["path"]).name for it in items] == ["COVID-00001.jpg", "COVID-00002a.png",
                                                                    "COVID-00002b.jpeg"]
    assert items[1].record.patient_id == items[2].record.patient_id == "COVID-00002"
    assert items[1].record.split == items[2].record.split
    assert skipped == [Skipped("COVID-00009.jpg", "missing file")]
    (f1 / "metadata.csv").write_text("id,finding\nx,COVID-19\n")
    with pytest.raises(UserError, match="patientid"):
        get_source("figure1").scan(f1)


def test_radiography_layouts(tmp_path):
    new = tmp_path / "new"
    for cls, n in (("COVID", 3), ("Normal", 4), ("Viral Pneumonia", 2), ("Lung_Opacity", 2)):
        (new / cls / "images").mkdir(parents=True)
        (new / cls / "masks").mkdir()
        for i in range(n):
            (new / cls / "images" / f"{cls}-{i + 1}.png").write_bytes(png(i))
            (new / cls / "masks" / f"{cls}-{i + 1}.png").write_bytes(png(99))
    (new / "COVID" / "images" / "notes.txt").write_text("not an image")
    items, skipped = scan("radiography", new)
    assert skipped == [] and len(items) == 11
    assert Counter(it.record.diagnosis for it in items) == {"covid": 3, "normal": 4, "pneumonia": 2, "other": 2}
    assert all("/images/" in it.record.meta["path"] for it in items)
    assert "radiography_Viral_Pneumonia_Viral_Pneumonia-1" in {it.record.key for it in items}

    old = tmp_path / "old"  # the first release: images directly in the class folders
    (old / "COVID-19").mkdir(parents=True)
    (old / "NORMAL").mkdir()
    (old / "COVID-19" / "COVID-19(1).png").write_bytes(png(1))
    (old / "NORMAL" / "NORMAL(1).png").write_bytes(png(2))
    items, _ = scan("radiography", old)
    assert [it.record.diagnosis for it in items] == ["covid", "normal"]
    with pytest.raises(UserError, match="class folders"):
        get_source("radiography").scan(tmp_path)


# ----------------------------------------------------------------------------- shared pieces

def test_get_source():
    assert {get_source(n).__name__.rsplit(".", 1)[-1] for n in SOURCE_NAMES} == {
        "nih", "covid_chestxray", "actualmed", "figure1", "radiography",
        "chexpert", "mimic", "padchest", "vindr", "rsna", "folder"}
    with pytest.raises(UserError, match="known sources: nih, covid-chestxray, .*, folder"):
        get_source("chexpert-v2")


@pytest.mark.parametrize("finding, diagnosis", [
    ("COVID-19", "covid"), ("COVID-19, ARDS", "covid"), ("Pneumonia/Viral/COVID-19", "covid"),
    ("Pneumonia/Viral/SARS", "pneumonia"), ("Streptococcus", "pneumonia"), ("Pneumocystis", "pneumonia"),
    ("Pneumonia/Bacterial/Streptococcus", "pneumonia"), ("Mycoplasma Bacterial Pneumonia", "pneumonia"),
    ("E.Coli", "pneumonia"), ("Pneumonia", "pneumonia"), ("Pneumonia/Lipoid", "pneumonia"),
    ("No Finding", "normal"), ("No finding", "normal"), ("ARDS", "other"), ("Tuberculosis", "other"),
    ("todo", None), ("Unknown", None), ("", None),
])
def test_diagnosis_from_finding(finding, diagnosis):
    assert diagnosis_from_finding(finding) == diagnosis


def test_key_collisions_are_deduped_deterministically(tmp_path):
    rows = [{"patientid": str(i), "finding": "COVID-19", "view": "PA", "modality": "X-ray", "filename": n}
            for i, n in enumerate(["a b.png", "a_b.png", "a.b.jpg", "a_b.jpeg"])]
    write_covid(tmp_path, rows)
    items, _ = scan("covid-chestxray", tmp_path)
    keys = {Path(it.record.meta["path"]).name: it.record.key for it in items}
    assert keys == {"a b.png": "covid-chestxray_a_b", "a.b.jpg": "covid-chestxray_a_b_2",
                    "a_b.jpeg": "covid-chestxray_a_b_3", "a_b.png": "covid-chestxray_a_b_4"}
