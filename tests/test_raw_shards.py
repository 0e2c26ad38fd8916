"""Raw shards (`build --encoding raw`): the same pixels as PNG shards, readable by plain webdataset, through
the project's stream (workers that persist across epochs, uint8 batches) and its manifest and inspect.

Pretraining on raw shards: tests/test_pretrain.py (the host-sync test runs on them); downstream training:
tests/test_downstream_stream.py (NIH-14 streamed from them).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from fixtures_downstream import SIZE, nih_raw_shards, nih_shards

from shards import manifest as mf
from shards.stream import _stack, decode_npy, images_to_float, make_loader
from shards.writer import encode_npy


def _pixels(folder, **kw) -> dict[str, torch.Tensor]:
    loader = make_loader(f"{folder}/*.tar", mode="eval", batch_size=5, **kw)
    return {k: img for b in loader for k, img in zip(b["key"], b["image"])}


def test_raw_shards_hold_the_png_shards_pixels_and_plain_webdataset_reads_them(tmp_path_factory, capsys):
    raw, png = nih_raw_shards(tmp_path_factory), nih_shards(tmp_path_factory)
    m_raw, m_png = mf.load_manifest(raw), mf.load_manifest(png)
    assert m_raw["encoding"]["name"] == "raw" and m_png["encoding"]["name"] == "png"
    assert m_raw["options"]["encoding"] == "raw" and "encoding" not in m_png["options"]  # PNG builds unchanged
    # raw costs its pixels plus a .npy header and tar padding; PNG compresses
    assert 1.0 < m_raw["encoding"]["bytes_per_pixel_byte"] < 2.0 and m_raw["encoding"]["bytes_per_image"] > SIZE ** 2
    assert m_png["encoding"]["bytes_per_image"] < m_raw["encoding"]["bytes_per_image"]

    from shards.__main__ import main
    assert main(["inspect", str(raw)]) == 0
    out = capsys.readouterr().out
    assert "encoding: raw, " in out and "kB per image on disk" in out and "checksums: all" in out

    ours = _pixels(raw, num_workers=2)  # through worker processes (shared-memory batches)
    assert ours.keys() == _pixels(png, num_workers=0).keys()
    theirs = _pixels(png, num_workers=0)
    assert all(ours[k].dtype == torch.uint8 and torch.equal(ours[k], theirs[k]) for k in ours)

    plain = wds.WebDataset(sorted(str(p) for p in raw.glob("*.tar")), shardshuffle=False).decode()
    n = 0
    for sample in plain:
        rec = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
        arr = sample["npy"]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and list(arr.shape) == rec["pixels"]["shape"]
        assert np.array_equal(arr, ours[sample["__key__"]][0].numpy())
        n += 1
    assert n == len(ours) == m_raw["totals"]["samples"]


def test_decode_npy_is_a_view_and_refuses_what_the_writer_never_writes():
    img = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    data = encode_npy(img)
    out = decode_npy(data)
    assert np.array_equal(out, img) and not out.flags.owndata  # a view of the tar member's bytes
    img16 = (np.arange(6, dtype=np.uint16) * 9000).reshape(2, 3)
    assert np.array_equal(decode_npy(encode_npy(img16)), img16)
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(img))
    huge = io.BytesIO()  # a header that claims 10^10 pixels over 4 bytes of data
    np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False, "shape": (100000, 100000)})
    bad = [huge.getvalue() + b"\0" * 4, data[:-1], data + b"\0", b"\x93NUMPY\x02\x00" + data[8:], encode_npy(img.astype(np.float32)),
           encode_npy(np.zeros((2, 2, 2), np.uint8)), encode_npy(np.zeros(5, np.uint8)), fortran.getvalue()]
    for b in bad:
        with pytest.raises(ValueError):
            decode_npy(b)


def test_workers_persist_across_epochs_and_each_epoch_keeps_its_own_order(tmp_path_factory):
    raw = nih_raw_shards(tmp_path_factory)
    kw = {"mode": "train", "batch_size": 4, "epoch_size": 16, "num_workers": 2, "shuffle_buffer": 8, "seed": 3}
    loader = make_loader(f"{raw}/*.tar", **kw)
    first = [k for b in loader for k in b["key"]]
    pids = [w.pid for w in loader._loader._iterator._workers]
    second = [k for b in loader for k in b["key"]]
    assert [w.pid for w in loader._loader._iterator._workers] == pids  # the same processes, not re-spawned
    fresh = make_loader(f"{raw}/*.tar", **kw)
    fresh.set_epoch(1)
    assert second == [k for b in fresh for k in b["key"]] != first  # epoch 1 in the persistent workers too
    loader.set_epoch(0)  # a jump: new workers, epoch 0 again
    assert [k for b in loader for k in b["key"]] == first
    assert loader.pin_memory is torch.cuda.is_available()


class _StackInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        t = _stack([np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)])
        yield t.is_shared(), t


def test_a_worker_stacks_its_batch_straight_into_shared_memory():
    """So the batch reaches the main process without the copy torch makes to share an ordinary tensor."""
    shared, t = next(iter(torch.utils.data.DataLoader(_StackInWorker(), batch_size=None, num_workers=1)))
    assert shared and t.dtype == torch.uint8 and t.shape == (2, 1, 4, 4) and int(t[1].sum()) == 16
    assert not _stack([np.zeros((2, 2), np.uint8)]).is_shared()  # in the main process: ordinary memory


def test_images_to_float_scales_the_stored_integers():
    u8 = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.equal(images_to_float(u8), torch.tensor([[0.0, 0.2, 1.0]]))
    u16 = torch.tensor([[0, 65535]], dtype=torch.uint16)
    assert torch.equal(images_to_float(u16, "cpu"), torch.tensor([[0.0, 1.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_arrive_pinned_and_convert_on_the_gpu(tmp_path_factory):
    raw = nih_raw_shards(tmp_path_factory)
    batch = next(iter(make_loader(f"{raw}/*.tar", mode="eval", batch_size=4, num_workers=1)))
    assert batch["image"].is_pinned() and batch["image"].dtype == torch.uint8
    x = images_to_float(batch["image"], "cuda")
    assert x.is_cuda and x.dtype == torch.float32 and torch.equal(x.cpu(), batch["image"].float() / 255)
    u16 = torch.tensor([[0, 1, 40000, 65535]], dtype=torch.uint16)  # 16-bit shards: moved as int16 bits
    assert torch.equal(images_to_float(u16, "cuda").cpu(), images_to_float(u16))
