"""The README's screenshots of the web page record what they were taken of, so that a changed page shows them stale.

``make screenshots`` (tests/e2e/test_ui.py with ``GRAFT_SCREENSHOTS_DIR``) writes the digest of
``service/ui/static`` beside the pictures; tests/unit/test_repository.py compares it with the page as it is.
"""

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "service" / "ui" / "static"
DIGEST_FILE = "ui-static.sha256"  # in the screenshots' folder


def static_digest() -> str:
    """sha256 over the page's files (each relative name, then its bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
        digest.update(path.relative_to(STATIC).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def record_digest(folder: Path) -> None:
    """Say, beside screenshots just taken, which page they show."""
    (folder / DIGEST_FILE).write_text(static_digest() + "\n")
