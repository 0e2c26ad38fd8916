"""shards.writer: deterministic, parallel, resumable, part-wise shard building, and manifest.json."""
from __future__ import annotations

import functools
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runkit.errors import UserError
from shards import manifest as mf
from shards.record import Record
from shards.writer import build, encode_png, parse_part

REPO = Path(__file__).resolve().parents[1]


# A tiny stand-in source with the shards.sources interface (duck-typed RawItem / Skipped), so the
# writer is tested on its own; the real sources are exercised through the CLI further down.
@dataclass(frozen=True)
class FakeItem:
    record: Record
    read: Callable[[], bytes]


@dataclass(frozen=True)
class FakeSkipped:
    name: str
    reason: str


def _gated_read(path: Path, gate: str) -> bytes:
    """A read that first takes one token (a file) from the folder `gate`, waiting while there is none.

    The kill test hands each run a few tokens: the run can read only that many images, then blocks, so
    it is still unfinished when it is killed, however fast or slow the machine is."""
    while True:
        for token in sorted(os.listdir(gate)):
            try:
                os.unlink(os.path.join(gate, token))  # atomic: one reader, in any process, gets each token
            except FileNotFoundError:
                continue
            return path.read_bytes()
        time.sleep(0.01)


def make_fake_src(root: Path, n: int = 24, size: int = 72) -> Path:
    """n small PNGs of mixed modes; #5 is zero bytes, #7 is text posing as a PNG."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = root / f"img{i:03d}.png"
        if i == 5:
            p.write_bytes(b"")
        elif i == 7:
            p.write_text("this is not an image")
        else:
            arr = rng.integers(0, 255, (size, size + 8 * (i % 3)), dtype=np.uint8)
            im = Image.fromarray(arr)
            im = im.convert(("L", "RGB", "P")[i % 3]) if i % 4 else Image.fromarray(arr.astype(np.uint16) * 200)
            im.save(p)
    return root


def fake_scan(root: Path, gate: str | None = None):
    for i, p in enumerate(sorted(Path(root).glob("*.png"))):
        if i == 3:
            yield FakeSkipped(p.name, "missing fields: age")
            continue
        split = "train" if i % 5 in (0, 1, 2) else ("val" if i % 5 == 3 else "test")
        rec = Record(key=f"fake_{p.stem}", image=None, source="fake", patient_id=f"p{i // 2}", split=split,
                     diagnosis=("covid", "normal", "pneumonia")[i % 3], findings=[] if i % 2 else ["Mass"],
                     meta={"path": p.name})
        read = functools.partial(_gated_read, p, gate) if gate else functools.partial(Path.read_bytes, p)
        yield FakeItem(rec, read)


def fake_build(src, out, **kw):
    """Entry point for subprocess builds (kill -9 tests)."""
    gate = kw.pop("gate", None)
    return build(fake_scan(src, gate), out, source="fake", progress=False, **kw)


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every shard, sidecar and the manifest: what must be byte-identical between builds."""
    files = sorted(out.glob("*.tar")) + sorted((out / mf.STATE_DIR).glob("*.json")) + [out / "manifest.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_fake_src(tmp_path_factory.mktemp("fake") / "src")


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    fake_build(src, out, size=32, max_count=4, workers=1)
    return out


def test_shards_are_plain_webdataset_with_deterministic_members(clean):
    tars = sorted(clean.glob("*.tar"))
    assert [t.name for t in tars] == ["test-000000.tar", "train-000000.tar", "train-000001.tar",
                                      "train-000002.tar", "train-000003.tar", "val-000000.tar"]
    with tarfile.open(tars[1]) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:2] == ["fake_img000.json", "fake_img000.png"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
        rec = json.loads(tar.extractfile(names[0]).read())
        image = np.asarray(Image.open(tar.extractfile(names[1])))
    assert rec["key"] == "fake_img000" and rec["split"] == "train" and rec["labels"]["diagnosis"] == "covid"
    assert rec["meta"]["path"] == "img000.png" and rec["meta"]["preprocess"]["orig_size"] == [72, 72]
    assert image.shape == (32, 32) and image.dtype == np.uint8


def test_manifest_counts_skips_and_options(clean):
    m = json.loads((clean / "manifest.json").read_text())
    assert m["options"] == {"size": 32, "square": "crop", "max_count": 4} and m["source"] == "fake"
    import shards
    assert m["version"] == shards.__version__
    skipped = {s["name"]: s for s in m["skipped"]}
    assert skipped["img003.png"] == {"name": "img003.png", "reason": "missing fields: age", "stage": "scan"}
    assert skipped["img005.png"]["reason"] == "zero bytes" and skipped["img005.png"]["stage"] == "build"
    assert skipped["img007.png"]["stage"] == "build"
    assert m["totals"]["skipped"] == 3 and m["totals"]["samples"] == 21
    for shard in m["shards"]:
        path = clean / shard["name"]
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 2 * shard["count"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == mf.sha256_file(path)
    train = m["splits"]["train"]
    keys = [i for i in range(24) if i % 5 in (0, 1, 2) and i not in (3, 5, 7)]
    assert train["samples"] == len(keys) == sum(s["count"] for s in m["shards"] if s["split"] == "train")
    assert train["labels"]["diagnosis"] == {d: sum(1 for i in keys if i % 3 == k) for k, d in
                                           enumerate(("covid", "normal", "pneumonia"))}
    assert train["labels"]["findings"] == {"Mass": sum(1 for i in keys if i % 2 == 0),
                                          "No Finding": sum(1 for i in keys if i % 2)}


def test_workers_1_and_2_give_identical_bytes(src, clean, tmp_path):
    result = fake_build(src, tmp_path, size=32, max_count=4, workers=2)
    assert result.written == 6 and result.samples == 21
    assert folder_bytes(tmp_path) == folder_bytes(clean)


@pytest.mark.faults
def test_rerun_keeps_verified_shards_and_redoes_damaged_ones(src, clean, tmp_path):
    fake_build(src, tmp_path, size=32, max_count=4, workers=1)
    (tmp_path / "train-000001.tar").write_bytes((tmp_path / "train-000001.tar").read_bytes()[:3000])  # truncated
    data = bytearray((tmp_path / "val-000000.tar").read_bytes())
    data[1500] ^= 0xFF  # same size, one flipped byte
    (tmp_path / "val-000000.tar").write_bytes(bytes(data))
    mf.sidecar_path(tmp_path, "test-000000.tar").unlink()  # killed between tar and sidecar
    (tmp_path / "manifest.json").unlink()
    (tmp_path / ".train-000002.tar.abc.tmp").write_bytes(b"left by kill -9")
    (tmp_path / "train-000009.tar").write_bytes(b"stale shard of an older plan")
    before = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    result = fake_build(src, tmp_path, size=32, max_count=4, workers=1)
    assert (result.written, result.kept) == (3, 3)
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == before  # kept, not rewritten
    assert folder_bytes(tmp_path) == folder_bytes(clean)
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "train-000009.tar").exists()


def test_changed_options_rebuild_everything(src, clean, tmp_path):
    fake_build(src, tmp_path, size=32, max_count=4, workers=1)
    result = fake_build(src, tmp_path, size=24, max_count=4, workers=1)
    assert (result.written, result.kept) == (6, 0)
    assert json.loads((tmp_path / "manifest.json").read_text())["options"]["size"] == 24


def test_parts_build_one_data_set_together(src, clean, tmp_path):
    r0 = fake_build(src, tmp_path, size=32, max_count=4, workers=1, part=(0, 2))
    assert r0.written == 3 and r0.manifest is None and not (tmp_path / "manifest.json").exists()
    r1 = fake_build(src, tmp_path, size=32, max_count=4, workers=1, part=(1, 2))
    assert r1.written == 3 and r1.manifest == tmp_path / "manifest.json"
    assert folder_bytes(tmp_path) == folder_bytes(clean)


def test_unreadable_and_unpicklable_inputs_become_skips(src, tmp_path):
    """A reader that fails is a skip, not a crash; under spawn a closure reader is read in the main process."""
    items = [it for it in fake_scan(src) if not hasattr(it, "reason")][:4]
    items[1] = FakeItem(items[1].record, functools.partial(Path.read_bytes, tmp_path / "gone.png"))
    items[2] = FakeItem(items[2].record, lambda: (src / "img000.png").read_bytes())  # not picklable
    result = build(items, tmp_path / "out", source="fake", size=16, max_count=1, workers=2, progress=False,
                   start_method="spawn")
    m = json.loads(result.manifest.read_text())
    assert m["totals"]["samples"] == 3
    assert m["skipped"] == [{"name": items[1].record.meta["path"], "reason": "unreadable: No such file or directory",
                             "stage": "build"}]


def test_png_encoder_round_trips_exactly():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (3, 7), (40, 33)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        decoded = Image.open(io.BytesIO(encode_png(image)))
        assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), image)
        Image.open(io.BytesIO(encode_png(image))).verify()  # chunk CRCs


def test_parse_part():
    assert parse_part("1/4") == (1, 4) and parse_part(None) is None
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(UserError):
            parse_part(bad)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("kills, max_count", [(5, 2), (8, 1)])
def test_kill9_at_random_points_then_rerun_is_byte_identical(src, tmp_path, kills, max_count):
    """SIGKILL a 2-worker build `kills` times, rerun each time, then let it finish: same bytes as clean.

    The test paces the build itself: each run may read only a few images (tokens in a gate folder; the
    next read waits), too few to finish, so every run is still working when it is killed, on any machine.
    Each kill (seeded) is either "mid-work": 1-2 tokens and a kill at a random moment after the first read
    (inside an image's processing, a tar write, a rename or a sidecar write, or at the gate), or "after a
    shard lands": enough tokens that some shard gets all its images, a wait for its sidecar, then a kill
    at a random moment soon after."""
    clean, out, gate = tmp_path / "clean", tmp_path / "out", tmp_path / "gate"
    fake_build(src, clean, size=32, max_count=max_count, workers=1)
    gate.mkdir()
    state = out / mf.STATE_DIR
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_writer as t; "
            f"t.fake_build({str(src)!r}, {str(out)!r}, size=32, max_count={max_count}, workers=2, gate={str(gate)!r})")

    def sidecars() -> int:
        return len(list(state.glob("*.json"))) if state.is_dir() else 0

    rng = random.Random(0)
    landed = 0
    for k in range(kills):
        after_landing = rng.random() < 0.5
        # 2 workers, max_count images per shard: 2 * max_count - 1 reads complete at least one shard.
        # The most any run reads, 4 (max_count 2) or 2 (max_count 1), times 5 or 8 runs, stays under
        # the 23 images: no run can finish.
        budget = 2 * max_count - 1 + rng.randint(0, 1) if after_landing else rng.randint(1, max_count)
        for i in range(budget):
            (gate / f"{k:02d}-{i}").touch()
        before = sidecars()
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                sidecars() == before if after_landing else len(os.listdir(gate)) == budget):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, f"run {k} ended before its kill (exit {proc.returncode})"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the build and its pool workers
        proc.wait()
        landed += sidecars() > before
        for token in os.listdir(gate):  # tokens a run did not use do not carry over
            os.unlink(gate / token)
        assert not (out / "manifest.json").exists()
    assert landed >= 1  # the "after a shard lands" kills did follow finished shards
    for i in range(100):  # the last run reads freely
        (gate / f"zz-{i:03d}").touch()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert folder_bytes(out) == folder_bytes(clean)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, check=False)


def test_cli_builds_phantom_nih_and_workers_do_not_change_bytes(tmp_path):
    from shards.synth import synth_nih

    src = synth_nih(tmp_path / "nih", 10, size=64, seed=0)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"shards{workers}"
        proc = _cli("build", "nih", "--src", str(src), "--out", str(out), "--size", "32", "--max-count", "3",
                    "--workers", workers, "--no-progress")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("wrote ") and "10 samples" in proc.stdout and "manifest.json" in proc.stdout
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1]
    m = json.loads(outs[0]["manifest.json"])
    assert m["source"] == "nih" and m["totals"]["samples"] == 10
    assert sum(sum(m["splits"][s]["labels"]["findings"].values()) for s in m["splits"]) >= 10


def test_cli_csv_without_required_columns_fails_at_once(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,something\n1,2\n")
    proc = _cli("build", "covid-chestxray", "--src", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "filename" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.real
@pytest.mark.slow
def test_cli_real_covid_chestxray_records_absent_files_in_manifest(shared_data, tmp_path):
    proc = _cli("build", "covid-chestxray", "--src", str(shared_data / "covid-chestxray-dataset"),
                "--out", str(tmp_path), "--size", "32", "--max-count", "200", "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["totals"]["samples"] == 527
    missing = [s for s in m["skipped"] if s["reason"] == "missing file"]
    assert len(missing) == 11 and m["skipped_by_reason"]["missing file"] == 11
    assert "527 samples" in proc.stdout and "missing file: 11" in proc.stdout
    assert _cli("inspect", str(tmp_path)).returncode == 0
