"""The downstream configs, one dataclass per job (runkit.typed): their fields are the CLI flags of
`launch/downstream.py <task>` and `launch/tune.py`, the keys of their YAML `--config` files, and the keys
a search space may set. A new option is one field here.

- `FinetuneConfig`: the classifier training loop (diagnosis and NIH-14 share it);
- `DiagnosisConfig`, `NIH14Config`, `CompareConfig`: the jobs built on it;
- `SeverityConfig`: frozen-backbone severity regression (one vocabulary for the CLI and sweeps);
- `SeverityProtocolConfig`: seed 000's table of feature sets x flips x split schemes;
- `SweepConfig`: a Ray Tune sweep (saved as OUT/sweep.json for --resume).
"""
# ruff: noqa: RUF009 - `option(...)` returns a dataclasses.field (a fresh list per instance for list defaults)
from __future__ import annotations

from dataclasses import dataclass

from downstream.device import check_spec
from runkit.errors import UserError
from runkit.typed import TypedConfig, option
from shards.record import SEVERITY_RANGES

SEVERITY_TARGETS = tuple(SEVERITY_RANGES)  # geographic_mean (0-8), opacity_mean (0-6)
FLIP_SETS = {"none": [], "h": ["h"], "v": ["v"], "hv": ["h", "v", "hv"]}  # "hv": every flip combination
REGRESSORS = ("linear", "ridge", "mlp")


@dataclass
class JobConfig(TypedConfig):
    """What every downstream job takes."""

    backbone: str = option("scratch:densenet121", tune=False,
                           help="RUN[/encoder.pt] | scratch[:arch] | xrv:FILE | chexnet:FILE | nih14:DIR")
    shards: list[str] | None = option(None, tune=False,
                                      help="shard folders, files, globs or brace patterns (any mix of sources)")
    image_size: int | None = option(None, low=8, tune=False, help="input size (default: the backbone's own)")
    device: str = option("auto", check=check_spec, tune=False, metavar="{auto,cpu,cuda[:i]}",
                         help="auto: the GPU when there is one (bf16 autocast there)")
    seed: int = option(0, low=0)
    num_threads: int | None = option(None, low=1, tune=False, help="torch CPU threads")
    progress: bool = option(True, tune=False, help="tqdm bars")


@dataclass
class FinetuneConfig(JobConfig):
    """The shared classifier training loop (downstream.finetune)."""

    mode: str = option("full", choices=("full", "partial", "linear"),
                       help="full fine-tune, partial unfreezing (discriminative lr) or linear probe")
    head: str = option("linear", choices=("linear", "mlp"))
    hidden: int = option(256, low=1, help="MLP head width")
    dropout: float = option(0.2, low=0.0, high=0.95)
    lr: float = option(1e-3, low=0.0, low_open=True, help="head learning rate")
    backbone_lr: float | None = option(None, low=0.0, low_open=True, help="full mode: backbone lr (default lr/10)")
    unfreeze: int = option(2, low=0, help="partial mode: deepest stages that train")
    lr_decay: float = option(0.3, low=0.0, high=1.0, help="partial mode: lr factor per stage downwards")
    weight_decay: float = option(1e-4, low=0.0)
    epochs: int = option(10, low=1)
    batch_size: int = option(32, low=1)
    eval_batch_size: int = option(64, low=1)
    steps_per_epoch: int | None = option(None, low=1, help="default: one pass over the training split")
    balance: str = option("sampler", choices=("sampler", "weights", "none"),
                          help="class-balanced sampling, a class-weighted loss, or neither")
    hflip: bool = option(True)
    vflip: bool = option(False)
    affine: bool = option(True, help="small rotation/scale/shift")
    brightness_contrast: bool = option(True)
    bn_recalibrate: int = option(16, low=0,
                                 help="batches used to re-estimate BatchNorm statistics after each epoch (0: off)")
    resplit: bool = option(False, help="ignore the shards' splits; stratified patient-grouped 64/16/20 split")
    split_seed: int = option(0, low=0)
    per_class: int | None = option(None, low=1, tune=False,
                                   help="keep N images per class (seed 004: 607), picked before any image loads")
    stream: str = option("auto", choices=("auto", "on", "off"), tune=False,
                         help="train from streamed shards instead of memory (auto: above --stream-above images)")
    stream_above: int = option(20000, low=1, tune=False, help="auto streaming threshold (images)")
    num_workers: int = option(0, low=0, tune=False, help="streaming: loader worker processes")
    shuffle_buffer: int = option(1000, low=1, tune=False, help="streaming: shuffle buffer (samples)")


@dataclass
class DiagnosisConfig(FinetuneConfig):
    """3-class diagnosis (COVID-19 / pneumonia / normal)."""

    scorecam_per_class: int = option(2, low=0, tune=False, help="Score-CAM overlays per class (0: none)")
    scorecam_max_channels: int = option(256, low=0, tune=False, help="most active channels used by Score-CAM (0: all)")


@dataclass
class NIH14Config(FinetuneConfig):
    """The NIH-14 multi-label head; streamed from the shards by default (NIH is 112k images)."""

    balance: str = option("none", choices=("weights", "none"),
                          help="a positive-weighted loss, or none (multi-label: no class sampler)")
    stream: str = option("on", choices=("auto", "on", "off"), tune=False,
                         help="train from streamed shards (on) or load the set into memory (off)")

    def validate(self) -> None:
        if self.head != "linear":
            raise UserError("the NIH-14 head is linear (its outputs become named severity features)")


@dataclass
class CompareConfig(DiagnosisConfig):
    """Diagnosis over seeds for several initialisations (seed 004: SSL init against scratch)."""

    backbones: list[str] | None = option(None, tune=False,
                                         help="backbone specs to compare, e.g. RUN/encoder.pt scratch:densenet121")
    names: list[str] | None = option(None, tune=False, help="a label per backbone (default: the specs)")
    seeds: list[int] = option([0, 1, 2], low=0, tune=False)


def _features_check(v: str) -> str | None:
    return None if str(v).strip() else "features must not be empty"


@dataclass
class SeverityConfig(JobConfig):
    """Frozen-backbone severity regression; the CLI and sweep trials share these keys."""

    features: str = option("pooled", check=_features_check,
                           help="pooled (last stage GAP) | multiscale (GAP of every stage) | pathologies (all "
                                "named outputs) | comma list of named outputs, e.g. lung_opacity,pneumonia")
    regressor: str = option("ridge", choices=REGRESSORS,
                            help="linear | ridge (alpha, or grouped inner CV over several) | mlp (one hidden layer)")
    alpha: list[float] = option([0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0], low=0.0,
                                help="ridge penalty / the MLP's L2; several: chosen by patient-grouped inner CV")
    inner_folds: int = option(5, low=2, help="ridge: patient-grouped inner CV folds for choosing alpha")
    hidden: int = option(32, low=1, help="MLP width")
    max_iter: int = option(500, low=1, help="MLP iterations")
    flip: str = option("hv", choices=tuple(FLIP_SETS),
                       help="flipped training copies (and test-time averaging): none | h | v | hv (h, v and both)")
    tta: bool = option(True, help="average test predictions over the same flips")
    targets: list[str] = option(list(SEVERITY_TARGETS), choices=SEVERITY_TARGETS, sep=",")
    test_size: float = option(0.2, low=0.0, high=1.0, low_open=True, help="held-out share of patients per repeat")
    repeats: int = option(50, low=1, help="repeated patient-grouped splits")
    folds: int = option(5, low=2, help="sweeps: patient-grouped CV folds on train+val (one report each)")
    batch_size: int = option(32, low=1, tune=False, help="feature extraction batch")

    def validate(self) -> None:
        if not self.targets:
            raise UserError("targets must name at least one of " + ", ".join(SEVERITY_TARGETS))
        if self.test_size >= 1:
            raise UserError(f"test_size must be below 1, got {self.test_size}")


@dataclass
class SeverityProtocolConfig(JobConfig):
    """Seed 000: all outputs, 4 outputs, one output, then + H-flip, + V-flip, + H/V-flip; 8:2 and Cohen's
    50/50 x 50 patient-grouped splits; MSE per target beside the mean predictor."""

    four: list[str] = option(["lung_opacity", "pneumonia", "infiltration", "consolidation"], sep=",",
                             help="the 4-output feature set")
    single: str = option("lung_opacity", help="the one-output feature set (CheXNet has no Lung Opacity: e.g. "
                                               "consolidation)")
    regressor: str = option("linear", choices=REGRESSORS, help="seed 000 and Cohen et al.: linear regression")
    alpha: list[float] = option([1.0], low=0.0, help="ridge / mlp penalty (several: grouped inner CV)")
    inner_folds: int = option(5, low=2)
    holdout_test_size: float = option(0.2, low=0.0, high=1.0, low_open=True, help="the 8:2 scheme's test share")
    holdout_repeats: int = option(50, low=1, help="repeats of the 8:2 patient-grouped split")
    cohen_repeats: int = option(50, low=1, help="repeats of Cohen's 50/50 patient-grouped split")
    tta: bool = option(False, help="average test predictions over the training flips")
    targets: list[str] = option(list(SEVERITY_TARGETS), choices=SEVERITY_TARGETS, sep=",")
    batch_size: int = option(32, low=1)


@dataclass
class SweepConfig(TypedConfig):
    """Everything that defines a sweep; saved as OUT/sweep.json so `--resume` needs only OUT."""

    task: str = option("severity", choices=("diagnosis", "severity"), cli=False)
    shards: list[str] | None = option(None, help="shard folders, files, globs or brace patterns")
    backbone: str = option("scratch:densenet121",
                           help="RUN[/encoder.pt] | scratch[:arch] | xrv:FILE | chexnet:FILE | nih14:DIR")
    space: str | None = option(None, help="search-space YAML (default: launch/configs/tune_<task>.yaml)")
    out: str = option("", cli=False)
    overrides: list[str] | None = option(None, cli=False)
    num_samples: int = option(8, low=1, help="trials (times the size of any grid)")
    scheduler: str = option("asha", choices=("asha", "fifo"))
    search: str = option("random", choices=("random", "optuna"))
    grace_period: int = option(1, low=1, help="ASHA: epochs (diagnosis) or folds (severity)")
    reduction_factor: int = option(2, low=2, help="ASHA reduction factor")
    max_failures: int = option(1, low=0, help="retries per trial before it counts as errored")
    cpus_per_trial: float = option(1.0, low=0.0, low_open=True)
    gpus_per_trial: float = option(0.0, low=0.0, help="GPUs Ray gives each trial; trials then run on CUDA")
    image_size: int | None = option(None, low=8, help="input size (default: the backbone's own)")
    seed: int = option(0, low=0, help="search seed")
    name: str | None = option(None, help="sweep name = W&B group (default: <task>-<OUT folder name>)")
    share_features: bool = option(True, help="compute frozen features once in the driver (--no-share-features: "
                                             "in every trial, for comparison)")
    wandb_project: str = option("xray-genesis")
    wandb_mode: str | None = option(None, choices=("online", "offline", "disabled"),
                                    help="default: WANDB_MODE, else online with a key, else offline")
    split_seed: int = option(0, low=0)
    resplit: bool = option(False, help="ignore the shards' splits (patient-grouped 64/16/20)")
    device: str = option("auto", check=check_spec, metavar="{auto,cpu,cuda[:i]}",
                         help="the driver's device (shared features, the final refit)")


# The options a trial of each task understands (search-space keys), plus the fault-injection switch.
TRIAL_CONFIGS = {"diagnosis": DiagnosisConfig, "severity": SeverityConfig}
FAULT_KEY = "fail"


def trial_keys(task: str) -> tuple[str, ...]:
    return TRIAL_CONFIGS[task].tunable_keys() + (FAULT_KEY,)
