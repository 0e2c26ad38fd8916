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

Keys are the tunable fields of the trial's config dataclass (downstream.config: `DiagnosisConfig` for
diagnosis, `SeverityConfig` for severity), so a typo is a `UserError` instead of a silently ignored
setting. Every constant, every choice/grid value and every range bound is validated as that field (type,
choices, range), like a flag or YAML value. The special key `fail` (false | true | N) makes a trial raise
after its N-th report (true = the first); it exists to prove that one failing trial does not abort a sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from downstream.config import FAULT_KEY, TRIAL_CONFIGS, trial_keys
from runkit.config import load_yaml
from runkit.errors import UserError
from runkit.typed import check_value

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "qrandint": 3, "choice": None, "grid": None}

TASK_KEYS = {task: trial_keys(task) for task in TRIAL_CONFIGS}


def _check(task: str, key: str, value, source: str):
    if key == FAULT_KEY:
        if not isinstance(value, (bool, int)):
            raise UserError(f"{source}: {FAULT_KEY} must be true/false or a report count, got {value!r}")
        return value
    return check_value(TRIAL_CONFIGS[task], key, value, source)


def _domain(task: str, key: str, spec: dict, source: str):
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
        values = [_check(task, key, v, source) for v in args]
        return (tune.choice if name == "choice" else tune.grid_search)(values)
    try:
        nums = [float(a) for a in args]
    except (TypeError, ValueError):
        raise UserError(f"search space key {key!r}: {name} bounds must be numbers, got {args!r}") from None
    if nums[0] >= nums[1] or (name == "loguniform" and nums[0] <= 0):
        raise UserError(f"search space key {key!r}: {name} needs 0 < low < high (log) or low < high, got {args!r}")
    integer = name in ("randint", "qrandint")
    for bound in (nums[0], nums[1] - 1 if name == "randint" else nums[1]):  # randint's high is exclusive
        _check(task, key, int(bound) if integer else bound, source)
    if name == "loguniform":
        return tune.loguniform(nums[0], nums[1])
    if name == "uniform":
        return tune.uniform(nums[0], nums[1])
    if name == "randint":
        return tune.randint(int(nums[0]), int(nums[1]))
    return tune.qrandint(int(nums[0]), int(nums[1]), int(nums[2]))


def parse_space(raw: dict, task: str, source: str = "search space") -> dict[str, Any]:
    """YAML mapping -> Tune param_space (tune domains and validated constants)."""
    known = TASK_KEYS[task]
    out = {}
    for key, spec in raw.items():
        if key not in known:
            raise UserError(f"{source}: unknown {task} option {key!r} (known: {', '.join(known)})")
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise UserError(f"{source}: key {key!r} must be a constant or one distribution, got {spec!r}")
            out[key] = _domain(task, key, spec, source)
        else:
            out[key] = _check(task, key, spec, source)
    return out


def read_space(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The raw YAML mapping of a space file plus `KEY=VALUE` overrides (values parsed as YAML)."""
    raw = dict(load_yaml(path)) if path else {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set features=pooled or --set 'lr={{choice: [0.1]}}'")
        try:
            raw[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    return raw


def load_space(path: str | Path | None, task: str, overrides: list[str] | None = None) -> tuple[dict, dict]:
    """(param_space, raw YAML mapping) from a space file plus `KEY=VALUE` overrides."""
    raw = read_space(path, overrides)
    return parse_space(raw, task, str(path or "search space")), raw


def drop_values(raw: dict, key: str, default: Any, unwanted) -> tuple[dict, list]:
    """The raw space without the values of `key` for which `unwanted(value)` holds: (new raw, dropped).

    A choice/grid keeps its other values; a constant that is unwanted is dropped entirely (the caller
    decides whether that is an error). Ranges are left alone."""
    spec = raw.get(key, default)
    if isinstance(spec, dict):
        (name, args), = spec.items()
        if name not in ("choice", "grid"):
            return raw, []
        keep = [v for v in args if not unwanted(v)]
        dropped = [v for v in args if unwanted(v)]
        if not dropped:
            return raw, []
        return ({**raw, key: {name: keep}} if keep else {k: v for k, v in raw.items() if k != key}), dropped
    if unwanted(spec):
        return {k: v for k, v in raw.items() if k != key}, [spec]
    return raw, []


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
