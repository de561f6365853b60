"""Fixtures: the SDK suite's kvcd fixture (client/python/tests/conftest.py, loaded under its
own module name so that the two conftest modules do not collide), the example module and
stories260K loaded through transformers."""

import importlib.util
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "kvc_sdk_fixtures", REPO / "client" / "python" / "tests" / "conftest.py")
_sdk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sdk)  # also puts client/python/src first on sys.path
kvcd = _sdk.kvcd
client = _sdk.client
bin_dir = _sdk.bin_dir

sys.path.insert(0, str(REPO / "client" / "python" / "examples"))
sys.path.insert(0, str(REPO / "tests" / "quality"))  # gguf_llama: the numpy reference model


def models_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVC_MODELS_DIR", REPO.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def stories_path() -> str:
    path = models_dir() / "stories260K.gguf"
    if not path.exists():
        pytest.fail(f"{path} missing (set KVC_MODELS_DIR)")
    return str(path)
