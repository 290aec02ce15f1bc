"""The gRPC door over TLS: a real grpc.aio server with a self-signed certificate made here,
the client over grpcs:// trusting it through a CA file; plaintext against the TLS port fails, and says why."""

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from client import connect
from client.errors import Unavailable
from client.grpc_client import GrpcClient
from client.retry import RetryPolicy
from service.config import Settings
from service.grpc.server import start_grpc_server
from service.runtime import Runtime

pytestmark = pytest.mark.anyio
NO_RETRY = RetryPolicy(attempts=1)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key (PEM), valid for a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    crypto = pytest.importorskip("cryptography", reason="neither the openssl CLI nor cryptography is installed")
    del crypto
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@pytest.fixture
async def tls_port(tmp_path):
    cert, key = self_signed(tmp_path)
    settings = Settings(data_dir=tmp_path, auth="open", backbones=[], grpc_tls_cert_file=cert, grpc_tls_key_file=key)
    server = await start_grpc_server(Runtime.open(settings), 0, host="127.0.0.1")
    yield server.port, cert
    await server.stop(grace=1)


async def test_the_client_calls_a_tls_grpc_port_over_grpcs_trusting_a_ca_file(tls_port):
    port, cert = tls_port
    with connect(f"grpcs://localhost:{port}", ca_file=str(cert), retry=NO_RETRY) as graft:
        assert await asyncio.to_thread(graft.list_backbones) == []  # the call went through: no backbone loaded
    assert graft.url == f"grpcs://localhost:{port}"


async def test_plaintext_to_a_tls_port_fails_and_says_to_use_grpcs(tls_port):
    port, _ = tls_port
    with connect(f"grpc://localhost:{port}", retry=NO_RETRY, timeout_s=5) as graft:
        with pytest.raises(Unavailable) as error:
            await asyncio.to_thread(graft.list_backbones)
    assert "use grpcs://" in str(error.value), error.value


async def test_grpcs_without_the_ca_file_refuses_a_self_signed_certificate(tls_port):
    port, _ = tls_port
    with connect(f"grpcs://localhost:{port}", retry=NO_RETRY, timeout_s=5) as graft:
        with pytest.raises(Unavailable) as error:  # the system's roots do not vouch for it
            await asyncio.to_thread(graft.list_backbones)
    assert "GRAFT_CA_FILE" in str(error.value), error.value


def test_a_tls_certificate_without_its_key_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="GRAFT_GRPC_TLS_KEY_FILE"):
        Settings(data_dir=tmp_path, grpc_tls_cert_file=tmp_path / "cert.pem")


async def test_an_unreadable_certificate_stops_the_start_naming_the_setting(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        auth="open",
        backbones=[],
        grpc_tls_cert_file=tmp_path / "missing.pem",
        grpc_tls_key_file=tmp_path / "missing-key.pem",
    )
    with pytest.raises(RuntimeError, match="GRAFT_GRPC_TLS_KEY_FILE"):
        await start_grpc_server(Runtime.open(settings), 0, host="127.0.0.1")


def test_a_ca_file_given_to_a_plaintext_grpc_client_is_a_usage_error():
    with pytest.raises(ValueError, match="grpcs://"):
        GrpcClient("localhost:1", ca_file="ca.pem")


def test_the_ca_file_comes_from_the_flag_else_graft_ca_file_else_the_config_file(tmp_path, monkeypatch):
    from client import config

    monkeypatch.setenv("GRAFT_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text('url = "grpcs://graft.example.com:443"\nca_file = "from-file.pem"\n')
    monkeypatch.delenv("GRAFT_CA_FILE", raising=False)
    assert config.load().ca_file == "from-file.pem"
    monkeypatch.setenv("GRAFT_CA_FILE", "from-env.pem")
    assert config.load().ca_file == "from-env.pem"
    assert config.load(ca_file="from-flag.pem").ca_file == "from-flag.pem"
