"""What the service and the CLI give away without need, and the headers of the web page."""

import os
import re
from pathlib import Path

import httpx
import pytest

from client import cli, config
from service.config import Settings
from service.errors import InvalidArgument, NotFound
from service.http.app import create_app
from service.runtime import Runtime
from service.store.blobs import BlobStore
from service.store.images import inspect_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}
STATIC = Path(__file__).resolve().parents[2] / "service" / "ui" / "static"


# -- error messages ------------------------------------------------------------------------------------------------


def test_a_non_image_upload_is_refused_naming_the_file_without_a_heap_address() -> None:
    with pytest.raises(InvalidArgument) as refused:
        inspect_image(b"%PDF-1.7 not an image at all", name="notes.pdf", **LIMITS)
    message = refused.value.message
    assert "file 'notes.pdf' is not a decodable image" in message
    assert not re.search(r"0x[0-9a-f]{6,}|BytesIO|<.* object", message), message


def test_a_truncated_image_says_so_without_object_reprs() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"
    with pytest.raises(InvalidArgument) as refused:
        inspect_image(png, name="cut.png", **LIMITS)
    assert "'cut.png'" in refused.value.message and " at 0x" not in refused.value.message


def test_missing_stored_bytes_do_not_name_their_storage_key(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    for missing in (lambda: blobs.get_named("heads/3f2a9c.safetensors"), lambda: blobs.get("ab" * 32)):
        with pytest.raises(NotFound) as gone:
            missing()
        assert "heads/" not in gone.value.message and "abab" not in gone.value.message
        assert not gone.value.details  # the error body carries details too


# -- the web page's headers ----------------------------------------------------------------------------------------


@pytest.fixture
async def client(tmp_path):
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[]))
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        yield client


@pytest.mark.anyio
async def test_the_page_sends_a_self_only_content_security_policy_and_cannot_be_framed(client) -> None:
    for path in ("/ui/", "/ui/main.js", "/ui/style.css", "/"):
        response = await client.get(path)
        policy = response.headers.get("content-security-policy", "")
        directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
        assert directives.get("default-src") == ["'self'"], (path, policy)
        assert directives.get("script-src") == ["'self'"] and directives.get("style-src") == ["'self'"]
        assert directives.get("frame-ancestors") == ["'none'"] and directives.get("object-src") == ["'none'"]
        assert response.headers.get("x-content-type-options") == "nosniff"
    # ... and the page needs nothing the policy refuses: no other origin, no inline script, style or handler
    page = (STATIC / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>|<style|\sstyle=|\son[a-z]+=", page)
    for script in STATIC.glob("*.js"):
        assert not re.search(r"""setAttribute\(["']style|innerHTML|eval\(|new Function""", script.read_text())


@pytest.mark.anyio
async def test_api_answers_cannot_be_framed_or_sniffed(client) -> None:
    response = await client.get("/v1/heads")
    assert response.status_code == 401
    assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert response.headers["x-content-type-options"] == "nosniff"


# -- the CLI's key -------------------------------------------------------------------------------------------------


def test_an_api_key_on_the_command_line_is_warned_about_on_stderr(monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    cli.main(["--url", "http://127.0.0.1:9", "--api-key", "graft_x", "--retries", "0", "heads"])
    err = capsys.readouterr().err
    assert "warning: --api-key" in err and "GRAFT_API_KEY" in err and "graft_x" not in err


def test_no_warning_when_the_key_comes_from_the_environment(monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", "graft_x")
    cli.main(["--url", "http://127.0.0.1:9", "--retries", "0", "heads"])
    assert "warning" not in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_a_config_file_holding_a_key_that_others_can_read_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text('url = "http://127.0.0.1:9"\napi_key = "graft_secret"\n')
    monkeypatch.setenv("GRAFT_CONFIG", str(path))
    monkeypatch.delenv("GRAFT_API_KEY", raising=False)
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"chmod 600") as refused:
        config.load()
    assert "0644" in str(refused.value) and "graft_secret" not in str(refused.value)
    path.chmod(0o600)
    assert config.load().api_key == "graft_secret"
    # a file without a key may be shared
    path.write_text('url = "http://127.0.0.1:9"\n')
    path.chmod(0o644)
    assert config.load().url == "http://127.0.0.1:9"
