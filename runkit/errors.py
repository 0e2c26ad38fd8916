"""Errors a user can cause exit with code 2 and one line naming the problem, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input, path, flag or config: the user can fix it, so no traceback is shown."""


def exit_on_user_error(main):
    """Decorate a CLI `main` so that a UserError prints one line to stderr and exits 2.

    Every entry point goes through here, so this is also where the process's stdout and stderr get their
    credential redaction (`runkit.redact.redact_stdio`): a signed shard URL never reaches a log."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from runkit.redact import redact_stdio

        redact_stdio()
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "error"
            print(f"{prog}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
