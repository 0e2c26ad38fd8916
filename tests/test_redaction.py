"""No credential inside a shard URL reaches a file: config.yaml, metrics, logs, the W&B run folder.

The end-to-end tests plant every kind of secret `runkit.redact` knows (URL userinfo, signed-URL query
parameters, Authorization and API-key headers of a `pipe:curl` command) in the shard URLs of real runs,
serve the shards over HTTP from this process (no network), and read back every byte each run wrote.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from fixtures_downstream import phantom_shards
from test_pretrain import PY, make_shards

from runkit.config import save_resolved, scrub_secrets
from runkit.redact import REDACTED, RedactingStream, redact

REPO = Path(__file__).resolve().parents[1]

# (text with a secret, the secret)
KINDS = [
    ("https://alice:pa55-w0rd@data.example.org/train-{000..009}.tar", "pa55-w0rd"),
    ("http://ghp_Tok3nOnly@127.0.0.1:8000/x.tar", "ghp_Tok3nOnly"),
    (("https://b.s3.amazonaws.com/x.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2026"
      "&X-Amz-Signature=f00dfeed&X-Amz-Security-Token=FQoGZXIvYXdz"), ("AKIAEXAMPLE", "f00dfeed", "FQoGZXIvYXdz")),
    ("https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&sig=Az0reSig%3D&se=2030", "Az0reSig"),
    ("https://storage.googleapis.com/b/x.tar?X-Goog-Signature=900913sig&X-Goog-Credential=gsa%40p", ("900913sig", "gsa")),
    ("https://h/x.tar?token=t0k&access_token=acc3ss#frag", ("t0k", "acc3ss")),
    ("https://h/x.tar?api_key=k3yv4l&key=plainkey&password=pw0rd", ("k3yv4l", "plainkey", "pw0rd")),
    ("pipe:curl -s -H 'Authorization: Bearer eyJhbGciOi.JWT' https://h/x.tar", "eyJhbGciOi.JWT"),
    ('pipe:curl -s -H "X-Api-Key: apik3y" -H "Cookie: session=c00kie" https://h/x.tar', ("apik3y", "c00kie")),
    ("pipe:curl -s --user bob:b0bpass https://h/x.tar", "b0bpass"),
    ("pipe:curl -s --oauth2-bearer 0authTok https://h/x.tar", "0authTok"),
    ("pipe:AWS_SECRET_ACCESS_KEY=wJalrXUtn aws s3 cp s3://b/x.tar -", "wJalrXUtn"),
    ('{"u": "pipe:curl -H \\"Authorization: Basic dXNlcjpw\\" http://h/x"}', "dXNlcjpw"),  # a JSON-escaped quote
]


@pytest.mark.parametrize("text,secrets", KINDS, ids=[k[0][:40] for k in KINDS])
def test_redact_removes_each_kind_and_keeps_the_rest(text, secrets):
    out = redact(text)
    for s in (secrets,) if isinstance(secrets, str) else secrets:
        assert s not in out, out
    assert REDACTED in out
    assert redact(out) == out                                   # idempotent
    if out.startswith("{"):
        json.loads(out)                                         # redacting a JSON string keeps it JSON


def test_redact_leaves_ordinary_text_alone():
    for text in ("/data/secret_project/train-000001.tar", "step 10  loss 0.5  lr 1e-3", "python -u -m x",
                 "nih=0.5:'/a/train-*.tar' chexpert=0.5:'/b/*.tar'", "exit code 3: returncode=3",
                 "https://host:8443/path/x.tar?shard=3&seed=0", "val/ssim 0.9 (n=12)"):
        assert redact(text) == text


def test_scrub_secrets_by_key_and_by_value(tmp_path):
    url = KINDS[0][0]
    data = {"train_shards": url, "api_key": "abc123", "nested": {"token": "t", "urls": [url, 3]},
            "hf_token": "hf_x", "lr": 0.1}
    clean = scrub_secrets(data)
    assert clean == {"train_shards": "https://<redacted>@data.example.org/train-{000..009}.tar",
                     "api_key": REDACTED, "nested": {"token": REDACTED,
                                                     "urls": ["https://<redacted>@data.example.org/train-{000..009}.tar", 3]},
                     "hf_token": REDACTED, "lr": 0.1}
    text = save_resolved(data, tmp_path).read_text()
    assert "pa55-w0rd" not in text and "abc123" not in text and "<redacted>@data.example.org" in text


def test_redacting_stream_under_a_console_capturer():
    """W&B's console capture patches `stream.write` and calls the original from its patch (as
    wandb.sdk.lib.console_capture does): it must record redacted text, and nothing may recurse."""
    raw = io.StringIO()
    stream = RedactingStream(raw)
    seen = []
    orig = stream.write

    def capture(s):
        n = orig(s)
        seen.append(s)
        return n

    stream.write = capture
    print("skipped shard in https://u:S3cr3t@h/x.tar", file=stream)
    assert "S3cr3t" not in raw.getvalue() and "S3cr3t" not in "".join(seen)
    assert raw.getvalue() == "skipped shard in https://<redacted>@h/x.tar\n" == "".join(seen)


def test_stream_errors_name_the_shard_without_its_credentials():
    from shards.stream import _WorkerStats

    stats = _WorkerStats()
    url = "https://u:S3cr3t@h/x.tar?token=T0k3n"
    stats.shard_error(OSError(f"(['curl', '-f', '{url}'],): exit 22", url))
    d = stats.delta()
    assert d["bad_shards"] == ["https://<redacted>@h/x.tar?token=<redacted>"]
    assert not any("S3cr3t" in r or "T0k3n" in r for r in d["reasons"]), d["reasons"]


# ------------------------------------------------------------------------------- end to end

@pytest.fixture
def http_shards(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1 (curl gets the shards as it would from a bucket)."""
    servers = []

    def serve(folder: Path) -> int:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _run_env(tmp_path: Path) -> dict:
    """W&B offline by default (no WANDB_MODE, no key), with a `wandb login` planted in NETRC that must not
    make it go online; every folder W&B or a temp file could use lies under tmp_path, where it is searched."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "n" * 40 + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("RANK", "WORLD_SIZE")}
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "TMPDIR"):
        (tmp_path / name.lower()).mkdir()
        env[name] = str(tmp_path / name.lower())
    env.update(NETRC=str(netrc), WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu", TQDM_DISABLE="1")
    return env


def _leaks(root: Path, secrets: list[str], skip: Path | None = None) -> list[str]:
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (skip and skip in p.parents):
            data = p.read_bytes()
            found += [f"{s} in {p.relative_to(root)}" for s in secrets if s.encode() in data]
    return found


def _offline_run(folder: Path) -> Path:
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not list((folder / "wandb").glob("run-*")), list((folder / "wandb").iterdir())
    assert not list(runs[0].rglob("media/images/*")), "an offline run got images"
    return runs[0]


@pytest.mark.slow
def test_pretrain_with_secret_shard_urls_writes_no_secret(tmp_path, http_shards):
    shards = tmp_path / "served"
    make_shards(shards, n_train_shards=2, per_shard=8, n_val=8, size=64)
    port = http_shards(shards)
    tag = f"{os.getpid()}x"
    s = {k: f"SeCrEt{k}{tag}" for k in ("userinfo", "amzcred", "amzsig", "token", "bearer", "apikey", "sig",
                                        "access", "bad")}
    train = (f"pipe:curl -s -f -H 'Authorization: Bearer {s['bearer']}' -H 'X-Api-Key: {s['apikey']}' "
             f"'http://127.0.0.1:{port}/train-000000.tar?sig={s['sig']}&access_token={s['access']}'")
    val = (f"http://alice:{s['userinfo']}@127.0.0.1:{port}/val-{{000000..000001}}.tar?X-Amz-Credential="
           f"{s['amzcred']}&X-Amz-Signature={s['amzsig']}&token={s['token']}"
           f" http://bob:{s['bad']}@127.0.0.1:{port}/missing-000000.tar?token={s['bad']}")  # a 404: logged
    env = _run_env(tmp_path)
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    cmd = [PY, "launch/pretrain.py", "--train-shards", train, "--val-shards", val, "--out", str(out),
           "--deepspeed_config", "launch/configs/ds_cpu.json", "--encoder", "resnet18", "--image-size", "64",
           "--batch-size", "4", "--epoch-size", "16", "--num-workers", "1", "--shuffle-buffer", "4",
           "--max-steps", "2", "--log-every", "1", "--val-every", "2", "--checkpoint-every", "2"]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                            check=False).returncode
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "val step 2" in text and "(n=8)" in text              # both served val shards were read
    assert "skipped shard in http://<redacted>@127.0.0.1" in text  # the 404 was logged, redacted
    config = (out / "config.yaml").read_text()
    assert f"Authorization: {REDACTED}" in config and f"http://{REDACTED}@127.0.0.1" in config
    _offline_run(out)                                            # the NETRC login did not make it online

    # a user error naming a secret URL: one line on stderr, redacted
    bad = tmp_path / "bad.log"
    with open(bad, "w") as f:
        rc = subprocess.run([PY, "launch/pretrain.py", "--train-shards", f"a=1:{shards}/train-*.tar {val}",
                             "--out", str(tmp_path / "bad")], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=300, check=False).returncode
    assert rc == 2 and "is not NAME=WEIGHT:PATTERN" in bad.read_text() and REDACTED in bad.read_text()

    leaks = _leaks(tmp_path, list(s.values()), skip=shards)
    assert not leaks, leaks


@pytest.mark.slow
def test_downstream_with_a_secret_shard_url_writes_no_secret(tmp_path, tmp_path_factory, http_shards):
    local = phantom_shards(tmp_path_factory)[1]
    port = http_shards(tmp_path)  # serves nothing by that name: the shard is a 404, skipped and logged
    s = {k: f"SeCrEt{k}{os.getpid()}d" for k in ("userinfo", "sig", "token")}
    remote = (f"http://carol:{s['userinfo']}@127.0.0.1:{port}/remote-000000.tar"
              f"?X-Amz-Signature={s['sig']}&token={s['token']}")
    out, log = tmp_path / "diag", tmp_path / "downstream.log"
    cmd = [PY, "launch/downstream.py", "diagnosis", "--shards", str(local), remote, "--backbone", "scratch:resnet18",
           "--mode", "linear", "--epochs", "1", "--image-size", "32", "--scorecam-per-class", "0",
           "--device", "cpu", "--out", str(out), "--no-progress"]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=_run_env(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                            timeout=600, check=False).returncode
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "skipped shard in http://<redacted>@127.0.0.1" in text
    assert f"http://{REDACTED}@127.0.0.1" in (out / "config.yaml").read_text()
    assert (out / "confusion.png").is_file()
    _offline_run(out)                                            # and the confusion matrix was not sent
    leaks = _leaks(tmp_path, list(s.values()))
    assert not leaks, leaks
