"""Fixtures: a real kvcd from $KVC_BIN_DIR (default build/bin), on free ports."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "client" / "python" / "src"))  # the package from source


def bin_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVC_BIN_DIR", REPO / "build" / "bin"))


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, seconds: float = 30.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text().strip())
        if proc.poll() is not None:
            raise RuntimeError(f"kvcd exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise TimeoutError(f"kvcd wrote no {path.name} in {seconds}s")


@pytest.fixture(scope="session")
def kvcd(tmp_path_factory):
    """Address "127.0.0.1:PORT" of a kvcd started for this session."""
    binary = bin_dir() / "kvcd"
    if not binary.exists():
        pytest.fail(f"{binary} not found; build kvcd or set KVC_BIN_DIR")
    tmp = tmp_path_factory.mktemp("kvcd")
    log = open(tmp / "kvcd.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "--address=127.0.0.1:0", f"--port_file={tmp / 'port'}",
         "--metrics_address=127.0.0.1:0", f"--metrics_port_file={tmp / 'metrics_port'}",
         "--worker_threads=2", "--backend_threads=1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        port = _wait_for(tmp / "port", proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def client(kvcd):
    import kvcompress

    with kvcompress.Client(kvcd, timeout=60) as c:
        yield c
