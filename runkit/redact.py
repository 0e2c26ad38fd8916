"""Credentials out of everything a run writes: config.yaml, metrics, logs, and what W&B records.

Two kinds of secret are removed:
- by key: the value of any mapping key that looks like a credential (`api_key`, `token`, `secret`,
  `password`) becomes `<redacted>` (`scrub_secrets`);
- by value (`redact`), inside any string:
  - URL userinfo: `https://user:TOKEN@host/x` -> `https://<redacted>@host/x`;
  - credential query parameters: `?token=`, `access_token=`, `sig=`, `X-Amz-Signature=`,
    `X-Amz-Credential=`, `X-Amz-Security-Token=`, `X-Goog-Signature=`, `key=`, ... -> `name=<redacted>`;
  - credential headers, as in `pipe:curl -H 'Authorization: Bearer X'` or `X-Api-Key: X`, `Cookie: X`
    (the value up to the closing quote or the end of the line);
  - command-line credentials: `curl -u user:pass`, `--user`, `--oauth2-bearer`, and `NAME=value`
    assignments whose name looks like a credential (`AWS_SECRET_ACCESS_KEY=...`).

`redact_stdio()` puts a redacting layer over sys.stdout and sys.stderr, so prints, logging, tqdm and
tracebacks of this process pass through `redact` (and so does W&B's copy of the console, which hooks the
streams' `write`). `redacted_argv()` hides the credentials in sys.argv from code that records it (W&B).
"""
from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

REDACTED = "<redacted>"

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)

# names (of query parameters, headers and assignments) that carry a credential
_LONG = r"token|secret|passw(?:or)?d|signature|credential|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
_NAME = rf"(?:[\w.-]*(?:{_LONG})[\w.-]*|sig|key|pwd|auth)"
_HEADER = rf"[\w-]*(?:authorization|cookie|{_LONG})[\w-]*"
_VALUE_END = r"""\s'"\\"""  # a value ends at whitespace, a quote, or a backslash (an escaped quote in a repr)

_RULES: list[tuple[re.Pattern, str]] = [
    # scheme://userinfo@host: everything between :// and the last @ before the path
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s'\"?#\\]*@", re.IGNORECASE), r"\1" + REDACTED + "@"),
    # Authorization: Bearer X / X-Api-Key: X / Cookie: X -- the rest of the header value
    (re.compile(rf"""((?:^|(?<=[\s'"])){_HEADER}\s*:[ \t]*)[^'"\\\r\n]+""", re.IGNORECASE), r"\1" + REDACTED),
    # ?token=X&sig=Y, NAME_TOKEN=X (query parameters and shell assignments)
    (re.compile(rf"((?:^|(?<=[\s'\"?&;:])){_NAME}=)[^&#{_VALUE_END}]+", re.IGNORECASE), r"\1" + REDACTED),
    # curl -u user:pass, --user user:pass, --proxy-user user:pass
    (re.compile(rf"((?:^|(?<=\s))(?:-u|--user|--proxy-user)(?:\s+|=))['\"]?[^{_VALUE_END}:]*:[^{_VALUE_END}]+['\"]?"),
     r"\1" + REDACTED),
    # curl --oauth2-bearer TOKEN
    (re.compile(rf"((?:^|(?<=\s))--oauth2-bearer(?:\s+|=))['\"]?[^{_VALUE_END}]+['\"]?"), r"\1" + REDACTED),
]


def redact(text: str) -> str:
    """`text` with every credential found inside it (URL userinfo, query tokens, auth headers) replaced."""
    if not isinstance(text, str) or not text:
        return text
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def scrub_secrets(obj: Any) -> Any:
    """Drop values whose key looks like a credential, and redact credentials inside every string value
    (and key): no API key or signed URL is ever written to a run folder."""
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k:
                (REDACTED if _SECRET_KEY.search(str(k)) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with its credentials redacted for the duration (W&B records the command line at init)."""
    saved = list(sys.argv)
    sys.argv[:] = [redact(a) for a in saved]
    try:
        yield
    finally:
        sys.argv[:] = saved


class RedactingStream:
    """A text stream that redacts what is written, then passes it on; every other attribute is the wrapped one's.

    Console capturers (W&B's) patch `stream.write` and call the original from their patch. Here `write` is
    a property: assigning it installs the capturer behind the redaction, so it records redacted text, and
    its call back into the original write goes straight to the wrapped stream. A secret split over two
    `write` calls is not seen (print writes each string in one call).
    """

    def __init__(self, stream):
        object.__setattr__(self, "_stream", stream)
        object.__setattr__(self, "_sink", stream.write)
        object.__setattr__(self, "_local", threading.local())

    @property
    def write(self):
        return self._redacting_write

    @write.setter
    def write(self, fn):
        object.__setattr__(self, "_sink", fn)

    def _redacting_write(self, s):
        if getattr(self._local, "busy", False):  # a patched write calling its original (redacting is idempotent)
            return self._stream.write(redact(s) if isinstance(s, str) else s)
        self._local.busy = True
        try:
            self._sink(redact(s) if isinstance(s, str) else s)
        finally:
            self._local.busy = False
        return len(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __setattr__(self, name, value):
        if name == "write":
            object.__setattr__(self, name, value)  # through the property's setter
        else:
            setattr(self._stream, name, value)


def redact_stdio() -> None:
    """Put `RedactingStream` over sys.stdout and sys.stderr (once; a second call changes nothing)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
