"""One strict state-dict loader: missing and unexpected keys and bad shapes in one UserError line."""
from __future__ import annotations

from torch import nn

from runkit.errors import UserError


def strict_load(module: nn.Module, state: dict, path, ignore: tuple[str, ...] = (), *,
                what: str = "the expected architecture") -> None:
    """load_state_dict(strict=True) that names what does not match instead of a multi-line traceback.

    Calls nn.Module's own method: smp's DenseNetEncoder overrides load_state_dict without `strict`."""
    state = {k: v for k, v in state.items() if k not in ignore}
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))

    def show(keys):
        return f"{keys[:6]}{' ...' if len(keys) > 6 else ''} ({len(keys)})"

    if missing or unexpected:
        raise UserError(f"{path} does not match {what}: missing keys {show(missing)}, "
                        f"unexpected keys {show(unexpected)}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want if state[k].shape != want[k].shape]
    if bad:
        raise UserError(f"{path}: shape mismatch for {bad[:4]}{' ...' if len(bad) > 4 else ''}")
    nn.Module.load_state_dict(module, state, strict=True)
