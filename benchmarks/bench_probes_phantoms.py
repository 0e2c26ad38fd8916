"""Online probes during Models Genesis restoration on phantoms: does the frozen encoder beat its random init?

    python benchmarks/bench_probes_phantoms.py [--steps 1000] [--every 500] [--lr 2e-3] [--encoder resnet18]

180 covid-format phantoms (the tests' set: `synth_covid`, seed 3, 128 px, built to 64-px shards in --work),
a plain PyTorch restoration loop (1 thread, batch 8, Adam), and `pretrain.probes.fit_probes` (patient-grouped
5-fold CV on the same images) at step 0 (the random init) and every --every steps. Prints one row per probe.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = ("multiscale/diagnosis_auroc", "pooled/diagnosis_auroc", "pooled/diagnosis_knn_bacc",
           "multiscale/severity_mse", "pooled/severity_mse")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_probes_phantoms"))
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch

    from pretrain.loss import RestorationLoss
    from pretrain.model import build_unet
    from pretrain.probes import encoder_features, fit_probes, load_probe_set
    from pretrain.transforms import genesis_batch
    from shards.sources import get_source
    from shards.synth import synth_covid
    from shards.writer import build

    torch.set_num_threads(1)
    work = Path(a.work)
    if not (work / "shards" / "manifest.json").exists():
        raw = synth_covid(work / "raw", 180, size=128, seed=3)
        build(get_source("covid-chestxray").scan(raw), work / "shards", source="covid-chestxray", size=64,
              workers=1, progress=False)
    data = load_probe_set(str(work / "shards"), image_size=64)
    print(f"probe set: {data.describe()}")
    images = data.images.float().div(255)
    torch.manual_seed(a.seed)
    unet = build_unet(a.encoder, cbam_decoder=False)
    opt = torch.optim.Adam(unet.parameters(), lr=a.lr)
    loss_fn = RestorationLoss("ssim")
    gen = torch.Generator().manual_seed(a.seed)
    print("\n| step | restoration loss | " + " | ".join(COLUMNS) + " | probe s |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))

    def probe(step: int, loss: float | None) -> None:
        t = time.perf_counter()
        m = fit_probes(encoder_features(unet.encoder, data.images, device=torch.device("cpu")), data)
        unet.train()
        print(f"| {step} | {'' if loss is None else f'{loss:.3f}'} | "
              + " | ".join(f"{m[f'probe/{k}']:.3f}" for k in COLUMNS) + f" | {time.perf_counter() - t:.1f} |",
              flush=True)

    probe(0, None)
    unet.train()
    for step in range(1, a.steps + 1):
        batch = images[torch.randint(len(images), (a.batch_size,), generator=gen)]
        corrupted, target = genesis_batch(batch, generator=gen)
        loss = loss_fn(unet(corrupted), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % a.every == 0:
            probe(step, loss.item())
    return 0


if __name__ == "__main__":
    sys.exit(main())
