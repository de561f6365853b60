"""TLS, mTLS and the bearer token from the Python SDK against a real kvcd started with
--tls_cert/--tls_key, --tls_client_ca and --auth_token_file (certificates made by openssl)."""

import shutil
import subprocess

import grpc
import numpy as np
import pytest

import kvcompress as kc
from conftest import _wait_for, bin_dir

TOKEN = "py-test-token-51c2"
H, HQ, D, T, W, L, KEEP = 2, 4, 32, 97, 8, 2, 20


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d):
    """ca, server (IP:127.0.0.1, DNS:localhost), client (signed by ca), stranger (other ca)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN={ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    leaves = {"server": ("ca", "localhost", "serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost"),
              "client": ("ca", "py-client", "clientAuth"),
              "stranger": ("other_ca", "py-stranger", "clientAuth")}
    for serial, (name, (ca, cn, usage)) in enumerate(leaves.items(), start=1):
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-set_serial", str(serial), "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def secure_kvcd(tmp_path_factory):
    """(target, pki dir) of a kvcd with mTLS and a bearer token."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    _make_pki(d)
    (d / "token").write_text(TOKEN + "\n")
    log = open(d / "kvcd.log", "wb")
    proc = subprocess.Popen(
        [str(bin_dir() / "kvcd"), "--address=127.0.0.1:0", f"--port_file={d / 'port'}",
         "--metrics_address=", "--worker_threads=2", "--backend_threads=1",
         f"--tls_cert={d / 'server.pem'}", f"--tls_key={d / 'server.key'}",
         f"--tls_client_ca={d / 'ca.pem'}", f"--auth_token_file={d / 'token'}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        port = _wait_for(d / "port", proc)
        yield f"127.0.0.1:{port}", d
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client(secure_kvcd, cert="client", **kwargs):
    target, d = secure_kvcd
    pem = lambda name: (d / name).read_bytes()  # noqa: E731
    if cert is not None:
        kwargs.setdefault("private_key", pem(f"{cert}.key"))
        kwargs.setdefault("certificate_chain", pem(f"{cert}.pem"))
    return kc.Client(target, timeout=10, root_certificates=pem("ca.pem"), **kwargs)


def _layers():
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((H, T, D), dtype=np.float32),
             rng.standard_normal((H, T, D), dtype=np.float32),
             rng.standard_normal((HQ, W, D), dtype=np.float32)) for _ in range(L)]


def test_mtls_and_token_compress(secure_kvcd):
    with _client(secure_kvcd, auth_token=TOKEN) as client:
        result = client.compress(_layers(), method=kc.Method.knorm(), keep_tokens=KEEP,
                                 request_id="py-secure-1")
    assert [list(layer.kept) for layer in result.layers] == [[KEEP, KEEP]] * L
    assert result.summary.request_id == "py-secure-1"
    assert result.summary.tokens_kept == L * H * KEEP


def test_server_name_override(secure_kvcd):
    with _client(secure_kvcd, auth_token=TOKEN, tls_server_name="localhost") as client:
        assert client.server_info().version


def test_missing_and_wrong_token_are_unauthenticated(secure_kvcd):
    with _client(secure_kvcd) as client:
        with pytest.raises(kc.KvcError) as missing:
            client.server_info()
    assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in missing.value.message
    with _client(secure_kvcd, auth_token=TOKEN + "x") as client:
        with pytest.raises(kc.KvcError) as wrong:
            client.compress(_layers(), method=kc.Method.knorm(), keep_tokens=KEEP)
    assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for this server" in wrong.value.message
    assert TOKEN not in wrong.value.message


def test_health_needs_no_token(secure_kvcd):
    with _client(secure_kvcd) as client:
        assert client.health("kvcompress.v1.KvCompress") == "SERVING"


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_mtls_refuses_clients_without_a_trusted_certificate(secure_kvcd, cert):
    kwargs = {}
    if cert is None:
        kwargs = {"private_key": None, "certificate_chain": None}
    with _client(secure_kvcd, cert=cert, auth_token=TOKEN, **kwargs) as client:
        with pytest.raises(kc.KvcError) as refused:
            client.server_info(timeout=5)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_arguments_are_checked():
    with pytest.raises(kc.KvcError) as half:
        kc.Client("127.0.0.1:1", private_key=b"key")
    assert half.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "go together" in half.value.message
    with pytest.raises(kc.KvcError) as both:
        kc.Client("127.0.0.1:1", credentials=grpc.ssl_channel_credentials(), tls=True)
    assert "not both" in both.value.message
    with pytest.raises(kc.KvcError) as name:
        kc.Client("127.0.0.1:1", tls_server_name="localhost")
    assert "needs TLS" in name.value.message
    with pytest.raises(kc.KvcError) as token:
        kc.Client("127.0.0.1:1", auth_token="two words")
    assert token.value.code == grpc.StatusCode.INVALID_ARGUMENT
