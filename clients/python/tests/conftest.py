"""A real keel for the tests: the debug binary (KEEL_BIN, or built with
cargo) in embedded mode on a fresh SQLite data dir and a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "correct horse battery staple"
READY_TIMEOUT = float(os.environ.get("KEEL_PY_READY_TIMEOUT", "30"))


@dataclass
class Keel:
    target: str
    log: Path


def keel_binary() -> str:
    given = os.environ.get("KEEL_BIN")
    if given:
        return given
    # Ask cargo where the executable is rather than guessing the target dir.
    build = subprocess.run(
        ["cargo", "build", "--bin", "keel", "--message-format=json-render-diagnostics"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    for line in build.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable"):
            if message["target"]["name"] == "keel":
                return str(message["executable"])
    raise RuntimeError("cargo build did not report a keel executable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_keel(binary: str, workdir: Path, **settings: str) -> tuple[subprocess.Popen[bytes], Keel]:
    port = free_port()
    data = workdir / "data"
    data.mkdir(mode=0o700)
    log = workdir / "keel.log"
    env = {
        key: value
        for key, value in os.environ.items()
        # A clean embedded-mode environment: no cluster settings leak in.
        if not key.startswith("KEEL_") or key == "KEEL_BIN"
    }
    env.update(
        KEEL_ENV="development",
        KEEL_LISTEN=f"127.0.0.1:{port}",
        KEEL_DATA_DIR=str(data),
        KEEL_LOG="info",
        KEEL_LOG_FORMAT="json",
        # Every test registers its own users from one address.
        KEEL_REGISTER_BURST="200",
        **settings,
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"keel exited during startup ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"keel not ready after {READY_TIMEOUT}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return process, Keel(target=f"127.0.0.1:{port}", log=log)


def stop_keel(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def binary() -> str:
    return keel_binary()


@pytest.fixture(scope="session")
def keel(binary: str) -> Iterator[Keel]:
    with tempfile.TemporaryDirectory(prefix="keel-py-") as workdir:
        process, server = start_keel(binary, Path(workdir))
        yield server
        stop_keel(process)


@pytest.fixture(scope="session")
def short_lived_keel(binary: str) -> Iterator[Keel]:
    """A keel whose access tokens live 3 seconds."""
    with tempfile.TemporaryDirectory(prefix="keel-py-") as workdir:
        process, server = start_keel(binary, Path(workdir), KEEL_ACCESS_TOKEN_TTL_SECONDS="3")
        yield server
        stop_keel(process)


@pytest.fixture
def email() -> str:
    return f"py-{uuid.uuid4().hex[:12]}@example.com"
