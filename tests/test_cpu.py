"""runkit.cpu reads the caches from the OS, and the CPU Genesis transforms size their chunks from them."""
from __future__ import annotations

import os

import pytest

from runkit import cpu


def _fake_sysfs(root, entries):
    for i, (level, kind, size, shared) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(f"{value}\n")
    return root


def test_caches_come_from_sysfs_and_the_core_cache_is_the_largest_private_data_cache(tmp_path):
    # an Ice Lake-like core: 48K L1d, 1280K L2 per core, 48 MiB L3 over 64 CPUs
    root = _fake_sysfs(tmp_path, [(1, "Data", "48K", "0"), (1, "Instruction", "32K", "0"),
                                  (2, "Unified", "1280K", "0"), (3, "Unified", "49152K", "0-31,32-63")])
    caches = cpu.read_caches(root)
    assert [(c.level, c.size, c.shared_by) for c in caches] == [(1, 48 << 10, 1), (1, 32 << 10, 1),
                                                                 (2, 1280 << 10, 1), (3, 48 << 20, 64)]
    assert cpu.core_cache_bytes(caches) == 1280 << 10
    assert "L2 1 MiB" in ", ".join(map(str, caches)) and "L3 48 MiB (shared by 64 CPUs)" in str(caches[3])
    assert cpu.parse_size("2048K") == 2 << 20 and cpu.parse_size("48 MiB") == 48 << 20


def test_without_sysfs_the_caches_come_from_sysconf(tmp_path, monkeypatch):
    sizes = {"SC_LEVEL1_DCACHE_SIZE": 32768, "SC_LEVEL2_CACHE_SIZE": 524288, "SC_LEVEL3_CACHE_SIZE": 0}
    monkeypatch.setattr(os, "sysconf", lambda name: sizes[name])
    caches = cpu.read_caches(tmp_path / "none")
    assert [(c.level, c.size) for c in caches] == [(1, 32768), (2, 524288)]
    assert cpu.core_cache_bytes(caches) == 524288


@pytest.mark.parametrize("cache, size, chunk", [(2 << 20, 224, 1), (2 << 20, 128, 4), (1280 << 10, 128, 2),
                                                (512 << 10, 128, 1), (32 << 20, 128, 64)])
def test_the_transforms_chunk_follows_the_core_cache(monkeypatch, cache, size, chunk):
    import torch

    import pretrain.transforms as T

    monkeypatch.setattr(cpu, "core_cache_bytes", lambda: cache)
    T.cpu_chunk_pixels.cache_clear()
    try:
        assert T.cpu_chunk_pixels() == cache // T.CHUNK_BYTES_PER_PIXEL
        seen = []
        orig = T._shuffle_values
        monkeypatch.setattr(T, "_shuffle_values", lambda x, layout, rows: seen.append(rows) or orig(x, layout, rows))
        x = torch.rand(chunk + 1, 1, size, size, generator=torch.Generator().manual_seed(0))  # one chunk, then 1
        cfg = T.GenesisConfig(local_shuffle_prob=1.0)
        T.genesis_batch(x, cfg, torch.Generator().manual_seed(1))
        assert seen and max(r.stop - r.start for r in seen) == chunk
    finally:
        T.cpu_chunk_pixels.cache_clear()
    monkeypatch.setattr(cpu, "core_cache_bytes", lambda: None)
    assert T.cpu_chunk_pixels() == T.DEFAULT_CHUNK_PIXELS
    T.cpu_chunk_pixels.cache_clear()
