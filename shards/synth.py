"""`python -m shards synth`: phantom data sets in the exact NIH ChestX-ray14 and ieee8023 formats, and
(with --n-chexpert, --n-mimic, --n-padchest, --n-vindr, --n-rsna, --n-folder; `shards.synth_sources`)
in the CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA and plain-folder layouts, DICOM included.
`--duplicates K` plants K NIH images again in folder/ and rsna/ to exercise duplicate detection.

The data-set folders hold only what the real releases hold, so the real loaders read them
unchanged. Ground truth (masks and rendering parameters) goes beside them, in
`<parent>/truth/<data-set folder name>/<image stem>.npz|.json`.

Every image is drawn from `default_rng([seed, data set, 0, index])` and every patient from
`default_rng([seed, data set, 1, patient])`, so an image does not depend on how many are made,
and follow-up images of one patient share an anatomy.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runkit.atomic import atomic_write_json, atomic_write_text
from runkit.errors import UserError
from shards import phantom
from shards.png import encode_png as _encode_png

NIH_CSV = "Data_Entry_2017_v2020.csv"
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
COVID_COLUMNS = (
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated", "intubation_present",
    "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature", "pO2_saturation",
    "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality", "date", "location",
    "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
)
SEVERITY_CSV = "annotations/covid-severity-scores.csv"
SEVERITY_HEADER = "filename,geographic_mean,opacity_mean"
SEVERITY_COMMENTS = (
    "## Severity scores of the synthetic phantoms written by `python -m shards synth` (same layout as ieee8023).",
    "## geographic_mean: extent of ground glass or consolidation per lung, 0 none, 1 <25%, 2 25-50%, 3 50-75%, 4 >75%; summed over both lungs, 0-8.",
    "## opacity_mean: density per lung, 0 none, 1 faint ground glass, 2 moderate, 3 dense consolidation; summed over both lungs, 0-6.",
    "## The real file averages three radiologists (Cohen et al. 2020); here each score is computed from the rendered lesion masks.",
    "## Masks and rendering parameters: ../../truth/covid-chestxray/<image stem>.npz and .json (shards.phantom.severity_from_masks).",
)
COVID_FINDINGS = {"covid": ("Pneumonia/Viral/COVID-19",), "normal": ("No Finding",), "pneumonia": (
    "Pneumonia/Bacterial/Streptococcus", "Pneumonia/Bacterial/Klebsiella", "Pneumonia/Bacterial/E.Coli",
    "Pneumonia/Bacterial/Legionella", "Pneumonia/Bacterial/Mycoplasma", "Pneumonia/Viral/SARS",
    "Pneumonia/Viral/Influenza", "Pneumonia")}
COVID_CLASSES = ("covid", "pneumonia", "normal")
NIH_WEIGHTS = {"Pneumonia": 0.22, "Infiltration": 0.13, "Effusion": 0.13, "Atelectasis": 0.09,
               "Cardiomegaly": 0.09, "Consolidation": 0.08, "Nodule": 0.08, "Mass": 0.06,
               "Pneumothorax": 0.06, "Edema": 0.06}
NIH_RENDERED = tuple(sorted(NIH_WEIGHTS))   # the NIH-14 findings the phantoms draw
GEOGRAPHIC_BINS = {1: (0.05, 0.21), 2: (0.29, 0.46), 3: (0.54, 0.71), 4: (0.79, 0.95)}
MARKER = "synth.json"
_NIH, _COVID = 1, 2
PNG_LEVEL = 1


# ----------------------------------------------------------------------------- encoding
def encode_png(img: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """8-bit (or 16-bit) grayscale PNG with the Up filter at zlib `level`: the project's one encoder."""
    return _encode_png(img, level)


def encode_image(img: np.ndarray, name: str, png_level: int = PNG_LEVEL) -> bytes:
    if name.lower().endswith(".png"):
        return encode_png(img, png_level)
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz with fixed zip timestamps, so equal masks give byte-identical files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------- truth
def truth_dir(out_dir: str | Path) -> Path:
    """Where the ground truth of the data set in `out_dir` lives: `<parent>/truth/<name>`."""
    out_dir = Path(out_dir)
    return out_dir.parent / "truth" / out_dir.name


def load_truth(out_dir: str | Path, image_name: str) -> tuple[dict[str, np.ndarray], dict]:
    """Masks and parameters of one image, e.g. `load_truth(DIR/'nih', '00000001_000.png')`."""
    base = truth_dir(out_dir) / Path(image_name).stem
    with np.load(base.with_suffix(".npz")) as z:
        masks = {k: z[k] for k in z.files}
    return masks, json.loads(base.with_suffix(".json").read_text())


def lung_densities(lesions: list[dict]) -> dict[str, float]:
    """Per-lung lesion density used for the opacity score: the densest rendered opacity in that lung."""
    dens = {"left": 0.0, "right": 0.0}
    for les in lesions:
        if les.get("pixels", 0) > 0 and "density" in les:
            dens[les["side"]] = max(dens[les["side"]], float(les["density"]))
    return dens


def _severity(ph: phantom.Phantom) -> dict:
    d = lung_densities(ph.params["lesions"])
    m = ph.masks
    return phantom.severity_from_masks(m["lung_left"], m["lung_right"], m["lesion"], d["left"], d["right"])


# ----------------------------------------------------------------------------- patients
def _patients(kind: int, seed: int, n: int, max_images: int) -> Iterator[tuple[int, int, int]]:
    """(image index, patient number, follow-up number) for the first n images; patients draw 1..max_images."""
    i = p = 0
    while i < n:
        count = int(np.random.default_rng([seed, kind, 2, p]).integers(1, max_images + 1))
        for k in range(count):
            if i >= n:
                return
            yield i, p, k
            i += 1
        p += 1


def _prepare(out_dir: str | Path) -> tuple[Path, Path]:
    """Create the data-set and truth folders; refuse to mix with files this command did not write."""
    out_dir = Path(out_dir)
    tdir = truth_dir(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (tdir / MARKER).is_file():
            raise UserError(f"{out_dir} is not empty and was not written by `shards synth`; choose another --out")
        shutil.rmtree(out_dir)          # our own earlier output: replace it whole, so no stale images stay
        shutil.rmtree(tdir, ignore_errors=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    tdir.mkdir(parents=True, exist_ok=True)
    return out_dir, tdir


def _write_image(out_dir: Path, tdir: Path, name: str, ph: phantom.Phantom, truth: dict, png_level: int):
    (out_dir / "images" / name).write_bytes(encode_image(ph.image, name, png_level))
    stem = Path(name).stem
    (tdir / f"{stem}.npz").write_bytes(_npz_bytes(ph.masks))
    (tdir / f"{stem}.json").write_text(json.dumps(_jsonable(truth), indent=1, sort_keys=True) + "\n")


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def _check(n: int, size: int):
    if n < 0:
        raise UserError(f"number of images must be >= 0, got {n}")
    if not 32 <= size <= 4096:
        raise UserError(f"--size must be between 32 and 4096 px, got {size}")


# ----------------------------------------------------------------------------- NIH ChestX-ray14
def _nih_lesions(rng: np.random.Generator, findings: list[str]) -> tuple[list[dict], float]:
    side = lambda: str(rng.choice(phantom.SIDES))
    lesions, cardio = [], 1.0
    for f in findings:
        if f == "Pneumonia":
            s = side()
            lobe = str(rng.choice(("upper", "middle", "lower") if s == "right" else ("upper", "lower")))
            lesions.append({"kind": "lobar", "side": s, "lobe": lobe, "fraction": rng.uniform(0.2, 0.55),
                            "density": rng.uniform(*phantom.DENSITY_BANDS[int(rng.choice([2, 3, 3]))])})
        elif f == "Consolidation":
            lesions.append({"kind": "patch", "side": side(), "fraction": rng.uniform(0.08, 0.25),
                            "density": rng.uniform(0.72, 0.9)})
        elif f == "Infiltration":
            for s in (phantom.SIDES if rng.random() < 0.5 else (side(),)):
                lesions.append({"kind": "patchy", "side": s, "fraction": rng.uniform(0.1, 0.3),
                                "density": rng.uniform(0.3, 0.5)})
        elif f == "Edema":
            for s in phantom.SIDES:
                lesions.append({"kind": "perihilar", "side": s, "fraction": rng.uniform(0.25, 0.45),
                                "density": rng.uniform(0.3, 0.5)})
        elif f == "Effusion":
            for s in (phantom.SIDES if rng.random() < 0.35 else (side(),)):
                lesions.append({"kind": "effusion", "side": s, "fraction": rng.uniform(0.08, 0.25), "density": 0.95})
        elif f == "Atelectasis":
            lesions.append({"kind": "atelectasis", "side": side(), "fraction": rng.uniform(0.03, 0.08),
                            "density": 0.8})
        elif f == "Mass":
            lesions.append({"kind": "blobs", "side": side(), "radii": [rng.uniform(0.06, 0.09)], "density": 0.85})
        elif f == "Nodule":
            k = int(rng.integers(1, 4))
            lesions.append({"kind": "blobs", "side": side(), "radii": list(rng.uniform(0.016, 0.03, size=k)),
                            "density": 0.8})
        elif f == "Pneumothorax":
            lesions.append({"kind": "pneumothorax", "side": side(), "fraction": rng.uniform(0.12, 0.3)})
        elif f == "Cardiomegaly":
            cardio = rng.uniform(1.3, 1.5)
    # free air first, so opacities drawn later keep their markings-free rim consistent
    lesions.sort(key=lambda les: les["kind"] != "pneumothorax")
    return lesions, cardio


def _nih_findings(rng: np.random.Generator) -> list[str]:
    if rng.random() < 0.42:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))
    names = list(NIH_WEIGHTS)
    w = np.array(list(NIH_WEIGHTS.values()))
    return sorted(str(x) for x in rng.choice(names, size=k, replace=False, p=w / w.sum()))


def synth_nih(out_dir, n: int, size: int = 256, seed: int = 0, progress: bool = False,
              png_level: int = PNG_LEVEL) -> Path:
    """Write n NIH ChestX-ray14-format phantoms to out_dir; truth goes to `truth_dir(out_dir)`."""
    _check(n, size)
    out_dir, tdir = _prepare(out_dir)
    rows, patient_split = [], {}
    with _bar(n, "nih", progress) as bar:
        for i, p, k in _patients(_NIH, seed, n, 4):
            prng = np.random.default_rng([seed, _NIH, 1, p])
            anat = phantom.sample_anatomy(prng)
            sex, age0 = str(prng.choice(["M", "F"])), int(prng.integers(18, 86))
            patient_split[p] = "test" if prng.random() < 0.23 else "train_val"
            rng = np.random.default_rng([seed, _NIH, 0, i])
            findings = _nih_findings(rng)
            view = "PA" if rng.random() < 0.6 else "AP"
            lesions, cardio = _nih_lesions(rng, findings)
            ph = phantom.render(size, anat, lesions, view, rng, cardiomegaly=cardio)
            name = f"{p + 1:08d}_{k:03d}.png"
            width, height = (int(rng.integers(2400, 3057)), int(rng.integers(2400, 3057))) if view == "PA" \
                else (2500, 2048)
            spacing = 0.143 if view == "PA" else float(rng.choice([0.139, 0.168]))
            age = age0 + k // 3
            label = "|".join(findings) if findings else "No Finding"
            rows.append([name, label, k, p + 1, age, sex, view, width, height, spacing, spacing])
            truth = {"dataset": "nih", "image": name, "index": i, "patient": p + 1, "follow_up": k,
                     "findings": findings, "view": view, "anatomy": anat, "render": ph.params,
                     "lung_density": lung_densities(ph.params["lesions"]), "severity": _severity(ph)}
            _write_image(out_dir, tdir, name, ph, truth, png_level)
            bar.update()

    # patient-disjoint split, ~77/23; both lists non-empty once there are two patients
    if len(patient_split) >= 2 and len(set(patient_split.values())) == 1:
        last = max(patient_split)
        patient_split[last] = "train_val" if patient_split[last] == "test" else "test"
    buf = io.StringIO()
    buf.write(NIH_HEADER + "\n")
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(out_dir / NIH_CSV, buf.getvalue())
    for split, fname in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        names = [r[0] for r in rows if patient_split[r[3] - 1] == split]
        atomic_write_text(out_dir / fname, "".join(f"{x}\n" for x in names))
    atomic_write_json(tdir / MARKER, {"format": "nih", "n": n, "size": size, "seed": seed})
    return out_dir


# ----------------------------------------------------------------------------- ieee8023 covid-chestxray
def _covid_lesions(rng: np.random.Generator, cls: str, level: int) -> list[dict]:
    if cls == "covid":
        out = []
        for s in phantom.SIDES:
            g = int(np.clip(level + rng.integers(-1, 2), 1, 4))
            o = int(np.clip(round(0.6 * g + rng.normal(0.2, 0.5)), 1, 3))
            out.append({"kind": "ggo", "side": s, "fraction": rng.uniform(*GEOGRAPHIC_BINS[g]),
                        "density": round(rng.uniform(*phantom.DENSITY_BANDS[o]), 4)})
        return out
    if cls == "pneumonia":
        s = str(rng.choice(phantom.SIDES))
        lobe = str(rng.choice(("upper", "middle", "lower") if s == "right" else ("upper", "lower")))
        g = int(np.clip(level, 1, 3))
        o = int(rng.choice([2, 3, 3, 3]))
        return [{"kind": "lobar", "side": s, "lobe": lobe, "fraction": rng.uniform(*GEOGRAPHIC_BINS[g]),
                 "density": round(rng.uniform(*phantom.DENSITY_BANDS[o]), 4)}]
    return []


def _covid_name(prng: np.random.Generator, style: int, p: int, k: int, offset: int, cls: str) -> str:
    if style == 0:
        return f"{p + 1:06d}-{k + 1}.{'png' if k % 2 else 'jpg'}"
    if style == 1:
        tag = "covid-19-pneumonia" if cls == "covid" else "pneumonia" if cls == "pneumonia" else "normal-chest"
        return f"{tag}-{p + 1}-day{offset}.jpg"
    if style == 2:
        return f"{prng.bytes(4).hex()}-{k}.jpg"
    h = prng.bytes(16).hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}-{k}.jpeg"


def _notes(cls: str, lesions: list[dict]) -> str:
    if cls == "covid":
        return "Bilateral peripheral ground-glass opacities, predominantly in the lower zones."
    if cls == "pneumonia":
        les = lesions[0]
        return f"Dense {les['lobe']} lobe consolidation of the {les['side']} lung with air bronchograms."
    return "Clear lungs. No focal consolidation, effusion or pneumothorax."


def synth_covid(out_dir, n: int, size: int = 256, seed: int = 0, progress: bool = False,
                png_level: int = PNG_LEVEL) -> Path:
    """Write n ieee8023 covid-chestxray-format phantoms (covid / pneumonia / normal, balanced by patient)."""
    _check(n, size)
    out_dir, tdir = _prepare(out_dir)
    meta_rows, sev_rows, used = [], [], set()
    months = ("January", "February", "March", "April", "May")
    with _bar(n, "covid-chestxray", progress) as bar:
        for i, p, k in _patients(_COVID, seed, n, 2):
            prng = np.random.default_rng([seed, _COVID, 1, p])
            anat = phantom.sample_anatomy(prng)
            cls = COVID_CLASSES[p % 3]
            sex, age = str(prng.choice(["M", "F"])), int(prng.integers(20, 90))
            finding = str(prng.choice(COVID_FINDINGS[cls]))
            level0 = int(prng.integers(1, 5))
            style = int(prng.integers(0, 4))
            day0 = int(prng.integers(1, 60))
            rng = np.random.default_rng([seed, _COVID, 0, i])
            offset = k * int(rng.integers(2, 8))
            level = int(np.clip(level0 + (rng.integers(-1, 2) if k else 0), 1, 4))
            views = {"covid": [0.45, 0.25, 0.30], "pneumonia": [0.6, 0.3, 0.1], "normal": [0.8, 0.2, 0.0]}[cls]
            view = str(rng.choice(["PA", "AP", "AP Supine"], p=views))
            lesions = _covid_lesions(rng, cls, level)
            ph = phantom.render(size, anat, lesions, "PA" if view == "PA" else "AP", rng)
            sev = _severity(ph)
            name = _covid_name(prng if k == 0 else rng, style, p, k, offset, cls)
            while Path(name).stem in used:        # truth files are keyed by stem, so stems must be unique
                name = f"{Path(name).stem}-{i}{Path(name).suffix}"
            used.add(Path(name).stem)
            geo = sev["geographic_mean"]
            day = day0 + offset
            row = dict.fromkeys(COVID_COLUMNS, "")
            row.update({
                "patientid": str(p + 1), "offset": "" if cls == "normal" else str(offset), "sex": sex,
                "age": str(age), "finding": finding, "view": view, "modality": "X-ray",
                "date": f"{months[min(day // 30, 4)]} {day % 30 + 1}, 2020" if rng.random() < 0.7 else "2020",
                "location": "synthetic phantom", "folder": "images", "filename": name,
                "license": "CC0", "clinical_notes": _notes(cls, lesions),
                "other_notes": f"shards.synth phantom: seed {seed}, index {i}",
            })
            if cls == "covid":
                row["pO2_saturation"] = str(int(np.clip(98 - 2.2 * geo + rng.normal(0, 2), 60, 100)))
                row["went_icu"] = "Y" if geo >= 6 else "N"
                row["intubated"] = "Y" if geo >= 7 else ("N" if rng.random() < 0.5 else "")
                row["survival"] = "N" if geo >= 7 and rng.random() < 0.4 else ("Y" if rng.random() < 0.5 else "")
            if cls != "normal" and rng.random() < 0.5:
                row["temperature"] = f"{rng.uniform(37.2, 39.8):.1f}"
            meta_rows.append(row)
            if cls != "normal" or rng.random() < 0.35:
                sev_rows.append((name, sev["geographic_mean"], sev["opacity_mean"]))
            truth = {"dataset": "covid-chestxray", "image": name, "index": i, "patient": p + 1, "follow_up": k,
                     "diagnosis": cls, "finding": finding, "view": view, "anatomy": anat, "render": ph.params,
                     "lung_density": lung_densities(ph.params["lesions"]), "severity": sev}
            _write_image(out_dir, tdir, name, ph, truth, png_level)
            bar.update()

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COVID_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(meta_rows)
    atomic_write_text(out_dir / "metadata.csv", buf.getvalue())
    sev_text = "".join(f"{c}\n" for c in SEVERITY_COMMENTS) + SEVERITY_HEADER + "\n"
    sev_text += "".join(f"{name},{g!r},{o!r}\n" for name, g, o in sev_rows)
    atomic_write_text(out_dir / SEVERITY_CSV, sev_text)
    atomic_write_json(tdir / MARKER, {"format": "covid-chestxray", "n": n, "size": size, "seed": seed})
    return out_dir


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for nih/, covid-chestxray/, the other sets asked for, and truth/")
    parser.add_argument("--n-nih", type=int, default=200, help="NIH ChestX-ray14-format images (default 200)")
    parser.add_argument("--n-covid", type=int, default=120, help="covid-chestxray-format images (default 120)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--png-level", type=int, default=PNG_LEVEL, choices=range(10), metavar="0-9",
                        help=f"zlib level of the PNGs (default {PNG_LEVEL})")
    for name, layout in (("chexpert", "CheXpert-v1.0-small (train.csv, valid.csv, JPEGs)"),
                         ("mimic", "MIMIC-CXR-JPG 2.0.0 (the four .csv.gz files, files/pXX/...)"),
                         ("padchest", "PadChest (labels CSV, 16-bit PNGs in numbered folders)"),
                         ("vindr", "VinDr-CXR Kaggle (train.csv, DICOM: MONOCHROME1/2, 12/16-bit, LUTs, RLE, JPEG 2000)"),
                         ("rsna", "RSNA Pneumonia (stage_2_* CSVs, DICOM)"),
                         ("folder", "a plain tree of PNG/JPEG/DICOM files with labels.csv")):
        parser.add_argument(f"--n-{name}", type=int, default=0, help=f"{layout} images in {name}/ (default 0)")
    parser.add_argument("--duplicates", type=int, default=0, metavar="K",
                        help="plant K NIH phantoms again in folder/ (PNG) and rsna/ (DICOM); listed in "
                             "truth/duplicates.json (needs --n-nih >= K and --n-folder or --n-rsna)")


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    _check(args.n_nih, args.size)
    _check(args.n_covid, args.size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    from shards import synth_sources

    counts = {name: getattr(args, f"n_{name}") for name in synth_sources.WRITERS}
    for n in counts.values():
        _check(n, args.size)
    if args.duplicates < 0 or args.duplicates > args.n_nih:
        raise UserError(f"--duplicates {args.duplicates}: must be between 0 and --n-nih ({args.n_nih})")
    if args.duplicates and not (counts["folder"] or counts["rsna"]):
        raise UserError("--duplicates needs --n-folder or --n-rsna (the sets the copies are planted in)")
    for name, n, fn in (("nih", args.n_nih, synth_nih), ("covid-chestxray", args.n_covid, synth_covid)):
        if n == 0:
            continue
        path = fn(out / name, n, size=args.size, seed=args.seed, progress=True, png_level=args.png_level)
        print(f"wrote {n} {name} phantoms ({args.size} px) to {path}  (ground truth: {truth_dir(path)})")
    planted = plant_duplicates(out, args.duplicates)
    for name, fn in synth_sources.WRITERS.items():
        if counts[name] == 0:
            continue
        kwargs = {"extra": planted} if name in ("folder", "rsna") and planted else {}
        path = fn(out / name, counts[name], size=args.size, seed=args.seed, progress=True, **kwargs)
        print(f"wrote {counts[name]} {name} phantoms ({args.size} px) to {path}  (ground truth: {truth_dir(path)})")
    return 0


def plant_duplicates(out: Path, k: int) -> list[tuple[str, np.ndarray]]:
    """The first k NIH phantoms as (name, pixels), recorded in `<out>/truth/duplicates.json`."""
    if k == 0:
        return []
    names = sorted(p.name for p in (out / "nih" / "images").iterdir())[:k]
    planted = [(f"dup-{Path(n).stem}", np.asarray(Image.open(out / "nih" / "images" / n).convert("L"))) for n in names]
    atomic_write_json(out / "truth" / "duplicates.json",
                      {"nih_images": names, "copies": [name for name, _ in planted], "in": ["folder", "rsna"]})
    return planted
