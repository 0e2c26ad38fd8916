"""Multi-source mixtures: the weighted-group syntax, proportions of the stream, realised-mix stats,
and equal full batches on every rank (in process, and under the deepspeed launcher)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_writer import fake_build, make_fake_src

from runkit.errors import UserError
from shards.stream import expand_urls, is_mixture, make_loader, parse_mixture

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.04  # absolute, on fractions of 2,400 draws: > 4 binomial standard deviations at p = 0.5


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[str, Path]:
    """Three shard folders with different shard sizes (2, 5 and 9 samples per shard)."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, n, per_shard in (("a", 20, 2), ("b", 30, 5), ("c", 40, 9)):
        out[name] = root / name
        src = make_fake_src(root / f"src-{name}", n=n, size=24)
        for f in src.iterdir():  # keys unique across groups: fake_<group>img000, ...
            f.rename(f.with_name(name + f.name))
        fake_build(src, out[name], size=16, max_count=per_shard, workers=1)
    return out


def keys_in(folder: Path) -> set[str]:
    keys = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as t:
            keys |= {m.name.rsplit(".", 1)[0] for m in t.getmembers()}
    assert keys
    return keys


def spec(groups, weights) -> str:
    return " ".join(f"{n}={w}:'{groups[n]}/*.tar'" for n, w in weights.items())


def test_parse_mixture_syntax(groups):
    s = spec(groups, {"a": 5, "b": 3, "c": 2})
    g = parse_mixture(s)
    assert [x.name for x in g] == ["a", "b", "c"]
    assert [x.weight for x in g] == pytest.approx([0.5, 0.3, 0.2])
    assert list(g[1].urls) == expand_urls(f"{groups['b']}/*.tar")
    assert is_mixture(s) and not is_mixture(f"{groups['a']}/*.tar") and parse_mixture(f"{groups['a']}/*.tar") is None
    two = parse_mixture(f"a=1:'{groups['a']}/train-*.tar {groups['a']}/val-*.tar'")
    assert list(two[0].urls) == expand_urls(f"{groups['a']}/train-*.tar {groups['a']}/val-*.tar")


@pytest.mark.parametrize("bad, words", [
    ("a=0.5:'{a}/*.tar' '{b}/*.tar'", "every token"),
    ("a=x:'{a}/*.tar'", "not a number"),
    ("a=0:'{a}/*.tar'", "positive"),
    ("a=-1:'{a}/*.tar'", "positive"),
    ("a=1:'{a}/*.tar' a=1:'{b}/*.tar'", "twice"),
    ("a=1:", "names no shards"),
    ("a=1:'{a}/nothing-*.tar'", "matches no files"),
])
def test_parse_mixture_errors(groups, bad, words):
    with pytest.raises(UserError, match=words):
        parse_mixture(bad.format(a=groups["a"], b=groups["b"]))


def test_stream_follows_the_weights_whatever_the_shard_sizes(groups):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    loader = make_loader(spec(groups, weights), mode="train", batch_size=8, epoch_size=2400, num_workers=0,
                         shuffle_buffer=50, seed=1)
    sets = {n: keys_in(groups[n]) for n in groups}
    seen = {n: 0 for n in groups}
    batches = 0
    for batch in loader:
        batches += 1
        assert len(batch["key"]) == 8 and batch["image"].shape == (8, 1, 16, 16)
        for key, group in zip(batch["key"], batch["group"]):
            assert key in sets[group]
            seen[group] += 1
    assert batches == len(loader) == 300
    mix = loader.realised_mix()
    for n, w in weights.items():
        assert mix[n]["samples"] == seen[n]
        assert mix[n]["target"] == pytest.approx(w)
        assert abs(mix[n]["fraction"] - w) < TOLERANCE, mix
    assert loader.mix_metrics() == {f"mix/{n}": round(mix[n]["fraction"], 4) for n in weights}
    assert loader.describe()["mixture"][0] == {"name": "a", "weight": 0.5, "shards": len(expand_urls(f"{groups['a']}/*.tar"))}


def test_unequal_weights_and_workers_are_deterministic(groups):
    s = spec(groups, {"a": 9, "c": 1})
    run = lambda: [k for b in make_loader(s, mode="train", batch_size=5, epoch_size=300, num_workers=2,
                                          shuffle_buffer=10, seed=3) for k in b["key"]]
    first = run()
    assert first == run()
    c_share = sum(k in keys_in(groups["c"]) for k in first) / len(first)
    assert abs(c_share - 0.1) < 0.06


def test_every_rank_gets_the_same_number_of_full_batches(groups):
    s = spec(groups, {"a": 1, "b": 1, "c": 1})
    lengths = []
    for rank in range(3):
        loader = make_loader(s, mode="train", batch_size=4, epoch_size=100, num_workers=1, seed=0, rank=rank,
                             world_size=3)
        sizes = [len(b["key"]) for b in loader]
        lengths.append(len(sizes))
        assert set(sizes) == {4}
    assert lengths == [8, 8, 8]


def test_expand_urls_keeps_the_groups_for_callers_that_want_a_list(groups):
    s = spec(groups, {"a": 3, "b": 1})
    urls = expand_urls(s)
    assert list(urls) == expand_urls(f"{groups['a']}/*.tar") + expand_urls(f"{groups['b']}/*.tar")
    assert [g.name for g in urls.groups] == ["a", "b"] and is_mixture(urls)
    loader = make_loader(urls, mode="train", batch_size=4, epoch_size=40, num_workers=0)  # as the engine calls it
    assert set(next(iter(loader))["group"]) <= {"a", "b"} and loader.realised_mix()["a"]["target"] == 0.75
    import pickle
    assert pickle.loads(pickle.dumps(urls)).groups == urls.groups


def test_plain_specs_are_unchanged_and_eval_reads_the_union(groups):
    plain = make_loader(f"{groups['a']}/*.tar", mode="train", batch_size=4, epoch_size=40, num_workers=0)
    batch = next(iter(plain))
    assert "group" not in batch and plain.realised_mix() == {} and plain.mix_metrics() == {}
    ev = make_loader(spec(groups, {"a": 1, "b": 3}), mode="eval", batch_size=7, num_workers=0)
    keys = [k for b in ev for k in b["key"]]
    assert sorted(keys) == sorted(keys_in(groups["a"]) | keys_in(groups["b"]))


@pytest.mark.slow
def test_equal_batches_per_rank_under_the_deepspeed_launcher(groups, tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher (deepspeed is in install_requires) is not on PATH"
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "CUDA_VISIBLE_DEVICES": "",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", env["MASTER_PORT"],
                           str(REPO / "tests" / "mixture_ranks.py"), "--spec", spec(groups, {"a": 0.7, "c": 0.3}),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["ranks"] == [[60, 4, 4], [60, 4, 4]]
    mix = res["mix"]
    assert mix["a"]["samples"] + mix["c"]["samples"] == 2 * 60 * 4
    assert abs(mix["a"]["fraction"] - 0.7) < 0.07  # 480 draws: > 3 standard deviations
    assert mix["a"]["samples"] > res["local"]["a"]["samples"]  # summed over both ranks
