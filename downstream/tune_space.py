"""Tune search spaces as small YAML files, so a sweep is edited without touching code.

Schema: a mapping of option -> either a constant (number, string, bool, list) or a one-key mapping
naming a distribution:

    lr:           {loguniform: [1.0e-4, 1.0e-2]}   # log-uniform float in [low, high)
    dropout:      {uniform: [0.0, 0.5]}            # uniform float
    unfreeze:     {randint: [1, 4]}                # integer in [low, high)
    hidden:       {qrandint: [32, 256, 32]}        # integer in [low, high], multiples of q
    head:         {choice: [linear, mlp]}          # one of the values
    fail:         {grid: [false, true]}            # every value (random search only; multiplies num_samples)
    epochs: 6                                      # a constant

Keys are checked against the task's options (`DIAGNOSIS_KEYS`, `SEVERITY_KEYS`), so a typo is a
`UserError` instead of a silently ignored setting. The special key `fail` (false | true | N) makes a trial
raise after its N-th report (true = the first); it exists to prove that one failing trial does not abort a sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from downstream.finetune import FINETUNE_DEFAULTS
from runkit.config import load_yaml
from runkit.errors import UserError

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "qrandint": 3, "choice": None, "grid": None}

# Options a diagnosis trial understands: everything `train_diagnosis` takes, plus the fault switch.
DIAGNOSIS_KEYS = tuple(FINETUNE_DEFAULTS) + ("resplit", "split_seed", "fail")

# Severity trial options (see downstream.tuning.SEVERITY_TRIAL_DEFAULTS for meanings).
SEVERITY_KEYS = ("features", "regressor", "alpha", "hidden", "max_iter", "flip", "tta", "targets", "folds",
                 "seed", "batch_size", "fail")
FLIP_SETS = {"none": [], "h": ["h"], "v": ["v"], "hv": ["h", "v", "hv"]}  # "hv": every flip combination

TASK_KEYS = {"diagnosis": DIAGNOSIS_KEYS, "severity": SEVERITY_KEYS}


def _domain(key: str, spec: dict):
    from ray import tune

    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise UserError(f"search space key {key!r}: unknown distribution {name!r}; "
                        f"use one of {', '.join(DISTRIBUTIONS)} or a constant")
    if not isinstance(args, list) or not args:
        raise UserError(f"search space key {key!r}: {name} needs a non-empty list, got {args!r}")
    want = DISTRIBUTIONS[name]
    if want is not None and len(args) != want:
        raise UserError(f"search space key {key!r}: {name} takes {want} numbers, got {args!r}")
    if name in ("choice", "grid"):
        return (tune.choice if name == "choice" else tune.grid_search)(list(args))
    try:
        nums = [float(a) for a in args]
    except (TypeError, ValueError):
        raise UserError(f"search space key {key!r}: {name} bounds must be numbers, got {args!r}") from None
    if nums[0] >= nums[1] or (name == "loguniform" and nums[0] <= 0):
        raise UserError(f"search space key {key!r}: {name} needs 0 < low < high (log) or low < high, got {args!r}")
    if name == "loguniform":
        return tune.loguniform(nums[0], nums[1])
    if name == "uniform":
        return tune.uniform(nums[0], nums[1])
    if name == "randint":
        return tune.randint(int(nums[0]), int(nums[1]))
    return tune.qrandint(int(nums[0]), int(nums[1]), int(nums[2]))


def parse_space(raw: dict, task: str, source: str = "search space") -> dict[str, Any]:
    """YAML mapping -> Tune param_space (tune domains and constants)."""
    known = TASK_KEYS[task]
    out = {}
    for key, spec in raw.items():
        if key not in known:
            raise UserError(f"{source}: unknown {task} option {key!r} (known: {', '.join(known)})")
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise UserError(f"{source}: key {key!r} must be a constant or one distribution, got {spec!r}")
            out[key] = _domain(key, spec)
        else:
            out[key] = spec
    return out


def load_space(path: str | Path | None, task: str, overrides: list[str] | None = None) -> tuple[dict, dict]:
    """(param_space, raw YAML mapping) from a space file plus `KEY=VALUE` overrides (values parsed as YAML)."""
    raw = dict(load_yaml(path)) if path else {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set features=pooled or --set 'lr={{choice: [0.1]}}'")
        try:
            raw[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    return parse_space(raw, task, str(path or "search space")), raw


def possible_values(raw: dict, key: str, default: Any) -> list:
    """Every value a key can take in the raw space (for the driver's precomputation); a range -> []."""
    spec = raw.get(key, default)
    if isinstance(spec, dict):
        (name, args), = spec.items()
        return list(args) if name in ("choice", "grid") else []
    return [spec]


def max_value(raw: dict, key: str, default: int) -> int:
    """Upper bound of an integer option (e.g. epochs, folds), the ASHA max_t."""
    spec = raw.get(key, default)
    if isinstance(spec, dict):
        (name, args), = spec.items()
        return int(max(args) if name in ("choice", "grid") else args[1])
    return int(spec)


def uses_grid(raw: dict) -> bool:
    return any(isinstance(v, dict) and "grid" in v for v in raw.values())
