"""The committed stubs are what generate_stubs.sh makes from proto/ today."""

import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent.parent


def test_stubs_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (tests/python/requirements.txt)")
    subprocess.run([str(HERE / "generate_stubs.sh"), str(tmp_path)], check=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    committed = HERE / "src" / "kvcompress" / "_proto"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    for name in names:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run client/python/generate_stubs.sh")
