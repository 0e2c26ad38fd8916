"""shards.stream: URL expansion, train/eval semantics under 2 ranks x 2 workers, and fault tolerance."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_writer import fake_build, make_fake_src

from runkit.errors import UserError
from shards.stream import decode_png, expand_urls, images_to_float, make_loader, shard_paths
from shards.writer import encode_png


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    src = make_fake_src(root / "src", n=40, size=48)
    out = root / "shards"
    fake_build(src, out, size=32, max_count=3, workers=1)
    return out


@pytest.fixture(scope="module")
def all_keys(shard_dir) -> list[str]:
    keys = []
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += [n[: -len(".json")] for n in tar.getnames() if n.endswith(".json")]
    return keys


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_expand_urls_lists_globs_braces_and_pipes(shard_dir):
    tars = sorted(str(p) for p in shard_dir.glob("*.tar"))
    train = [t for t in tars if "/train-" in t]
    assert expand_urls(f"{shard_dir}/train-*.tar") == train
    assert expand_urls(f"{shard_dir}/train-{{000000..000002}}.tar") == train[:3]
    assert expand_urls(f"'{train[0]}' {shard_dir}/val-*.tar") == [train[0]] + [t for t in tars if "/val-" in t]
    assert expand_urls([train[1], f"file:{train[2]}"]) == [train[1], train[2]]
    assert expand_urls(f"pipe:cat {shard_dir}/x-{{0..1}}.tar") == [f"pipe:cat {shard_dir}/x-0.tar",
                                                                    f"pipe:cat {shard_dir}/x-1.tar"]
    assert expand_urls(f"'pipe:cat a.tar' {train[0]}") == ["pipe:cat a.tar", train[0]]
    assert shard_paths(shard_dir, "train") == train


@pytest.mark.faults
@pytest.mark.parametrize("spec, words", [
    ("{d}/nope-000000.tar", "does not exist"),
    ("{d}/nope-*.tar", "matches no files"),
    ("{d}/train-{{000000..000099}}.tar", "does not exist"),
    ("{d}", "is a folder"),
    ("", "no shards"),
])
def test_bad_urls_fail_at_start_up(shard_dir, spec, words):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=words):
        make_loader(spec.format(d=shard_dir), mode="eval", batch_size=4, num_workers=2)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("via_env", [False, True])
def test_train_mode_equal_full_batches_on_every_rank(shard_dir, monkeypatch, via_env):
    counts = []
    for rank in range(2):
        if via_env:
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            kw = {}
        else:
            kw = {"rank": rank, "world_size": 2}
        loader = make_loader(f"{shard_dir}/train-*.tar", mode="train", batch_size=4, epoch_size=50,
                             num_workers=2, shuffle_buffer=8, seed=1, **kw)
        assert len(loader) == 50 // (2 * 4)
        batches = list(loader)
        assert all(b["image"].shape == (4, 1, 32, 32) for b in batches)
        counts.append(len(batches))
    assert counts == [6, 6]
    img = batches[0]["image"]  # the stored integers: converted on the device by images_to_float
    assert img.dtype == torch.uint8 and images_to_float(img).dtype == torch.float32
    assert torch.equal(images_to_float(img), img.float() / 255.0)
    assert batches[0]["target"] is None and len(batches[0]["record"]) == 4


def test_train_mode_is_seeded_per_rank_and_epoch(shard_dir):
    def epochs(rank, seed=0):
        loader = make_loader(f"{shard_dir}/train-*.tar", mode="train", batch_size=4, epoch_size=16,
                             num_workers=0, seed=seed, rank=rank, world_size=2, shuffle_buffer=8)
        return keys_of(loader), keys_of(loader)

    e0, e1 = epochs(0)
    assert epochs(0) == (e0, e1)  # reproducible
    resumed = make_loader(f"{shard_dir}/train-*.tar", mode="train", batch_size=4, epoch_size=16, num_workers=0,
                          seed=0, rank=0, world_size=2, shuffle_buffer=8)
    resumed.set_epoch(1)
    assert keys_of(resumed) == e1 and resumed.describe()["epoch"] == 2
    assert e0 != e1  # a new epoch draws new shards
    assert epochs(1)[0] != e0  # ranks draw differently


@pytest.mark.parametrize("pattern", ["*.tar", "val-*.tar"])  # many shards; fewer shards than 2x2 slots
def test_eval_mode_every_sample_exactly_once_over_2_ranks_x_2_workers(shard_dir, all_keys, pattern):
    urls = expand_urls(f"{shard_dir}/{pattern}")
    names = set()
    for u in urls:
        with tarfile.open(u) as tar:
            names.update(tar.getnames())
    expected = [k for k in all_keys if k + ".json" in names]
    assert (len(urls) < 2 * 2) == (pattern == "val-*.tar")
    seen = []
    for rank in range(2):
        loader = make_loader(urls, mode="eval", batch_size=5, num_workers=2, rank=rank, world_size=2)
        batches = list(loader)
        assert all(len(b["key"]) == 5 for b in batches[:-1]) and 1 <= len(batches[-1]["key"]) <= 5
        seen += [k for b in batches for k in b["key"]]
    assert Counter(seen) == Counter(expected) and max(Counter(seen).values()) == 1


def test_png_fast_path_matches_pil_and_rejects_damage():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 23), dtype=np.uint8)
    data = encode_png(image)
    assert np.array_equal(decode_png(data), image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # PIL's filters: the fallback path
    assert np.array_equal(decode_png(buf.getvalue()), image)
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="PNG")
    assert decode_png(buf.getvalue()).shape == (37, 23)
    broken = bytearray(data)
    broken[60] ^= 0x55  # inside the compressed data
    with pytest.raises((zlib.error, ValueError)):
        decode_png(bytes(broken))


def test_select_keeps_targets_and_drops_none(shard_dir):
    def covid(record):
        d = record["labels"]["diagnosis"]
        return None if d == "pneumonia" else int(d == "covid")

    loader = make_loader(f"{shard_dir}/*.tar", mode="eval", batch_size=64, select=covid, num_workers=0,
                         image_size=16)
    (batch,) = list(loader)
    assert batch["image"].shape[1:] == (1, 16, 16)
    diags = [r["labels"]["diagnosis"] for r in batch["record"]]
    assert "pneumonia" not in diags and loader.stats.dropped > 0
    assert batch["target"].tolist() == [int(d == "covid") for d in diags]


def test_pipe_urls_stream_like_files(shard_dir):
    files = expand_urls(f"{shard_dir}/val-*.tar")
    piped = keys_of(make_loader([f"pipe:cat {f}" for f in files], mode="eval", batch_size=4, num_workers=0))
    assert piped == keys_of(make_loader(files, mode="eval", batch_size=4, num_workers=0)) and piped


@pytest.fixture
def damaged(shard_dir, tmp_path) -> tuple[Path, dict]:
    """A copy of the train shards with one truncated mid-member and one sample whose PNG is garbage."""
    for p in shard_dir.glob("train-*.tar"):
        shutil.copy(p, tmp_path / p.name)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    truncated = tmp_path / names[1]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    bad = tmp_path / names[2]
    with tarfile.open(bad) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(bad.read_bytes())
    data[png.offset_data:png.offset_data + 8] = b"GARBAGE!"  # same size, broken PNG signature
    bad.write_bytes(bytes(data))
    return tmp_path, {"truncated": str(truncated), "bad_sample": png.name[:-4]}


@pytest.mark.faults
def test_corrupt_shards_are_skipped_and_counted_in_eval(shard_dir, damaged):
    folder, info = damaged
    loader = make_loader(f"{folder}/train-*.tar", mode="eval", batch_size=4, num_workers=2)
    keys = keys_of(loader)  # (no sleep per error: test_errors_cost_no_sleep)
    stats = loader.stats
    assert info["bad_sample"] not in keys and stats.sample_errors >= 1
    assert stats.shard_errors >= 1 and info["truncated"] in stats.bad_shards
    clean = keys_of(make_loader(f"{shard_dir}/train-*.tar", mode="eval", batch_size=4, num_workers=2))
    # everything outside the damaged spots still arrives
    assert set(keys) <= set(clean) and len(clean) - len(keys) <= 4 and stats.samples == len(keys)


N_ERRORS = 24


def _garbage_samples_shard(path: Path, n: int) -> None:
    """A shard whose n samples have a valid JSON and a PNG that is not one."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("json", json.dumps({"key": f"g{i}"}).encode()), ("png", b"GARBAGE!" * 16)):
                info = tarfile.TarInfo(f"g{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.faults
def test_errors_cost_no_sleep(shard_dir, tmp_path):
    """webdataset's warn_and_continue sleeps 0.5 s per error; the reader's handlers must not sleep at all.
    24 truncated shards and 24 undecodable samples give >= 48 errors (a cut shard counts a tar error and an
    incomplete sample too): a 0.5 s sleep per error would add >= 24 s to the pass. The bound, twice a clean
    pass of the same good shards plus 3 s, leaves room for a loaded machine's jitter and still fails any
    sleep of 0.07 s per error or more."""
    good = sorted(shard_dir.glob("train-*.tar"))
    for i in range(N_ERRORS):
        (tmp_path / f"cut-{i:03d}.tar").write_bytes(good[i % len(good)].read_bytes()[:2000])  # mid-member
    _garbage_samples_shard(tmp_path / "garbage.tar", N_ERRORS)
    bad = [str(p) for p in sorted(tmp_path.glob("*.tar"))]

    def timed(urls):
        t0 = time.monotonic()
        loader = make_loader(urls, mode="eval", batch_size=4, num_workers=0)
        n = len(keys_of(loader))
        return time.monotonic() - t0, n, loader.stats

    clean_s, clean_n, _ = timed([str(p) for p in good])
    damaged_s, n, stats = timed([str(p) for p in good] + bad)
    assert stats.shard_errors >= N_ERRORS and stats.sample_errors >= N_ERRORS, stats.as_dict()
    assert n >= clean_n  # the truncated copies may still give the samples before their cut
    assert damaged_s < 2 * clean_s + 3.0, f"{damaged_s:.2f} s with {stats.skipped} errors vs {clean_s:.2f} s clean"


@pytest.mark.faults
def test_training_continues_through_corrupt_shards(damaged):
    folder, _ = damaged
    loader = make_loader(f"{folder}/train-*.tar", mode="train", batch_size=4, epoch_size=120, num_workers=2,
                         shuffle_buffer=4, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 30 and all(len(b["key"]) == 4 for b in batches)
    assert loader.stats.skipped >= 1 and loader.stats.samples == 120


def test_train_mode_gives_up_when_select_drops_everything(shard_dir):
    loader = make_loader(f"{shard_dir}/val-*.tar", mode="train", batch_size=2, epoch_size=4, num_workers=0,
                         select=lambda r: None)
    with pytest.raises(UserError, match="no usable sample"):
        list(loader)


def test_bad_arguments_are_user_errors(shard_dir):
    url = f"{shard_dir}/val-*.tar"
    for kw in ({"mode": "test", "batch_size": 2}, {"mode": "train", "batch_size": 2},
               {"mode": "train", "batch_size": 4, "epoch_size": 7, "rank": 0, "world_size": 2},
               {"mode": "eval", "batch_size": 2, "rank": 2, "world_size": 2}):
        with pytest.raises(UserError):
            make_loader(url, **kw)
    records = [json.loads(json.dumps(r)) for b in make_loader(url, mode="eval", batch_size=8, num_workers=0)
               for r in b["record"]]
    assert all(r["split"] == "val" for r in records)
