"""Habits of the whole repository: it stands alone, its docs name every setting, and graft's own deprecated calls
fail the tests."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from harness.screenshots import DIGEST_FILE, static_digest
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
# Notes kept beside the working copy while graft was built; a clone does not have them.
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ["../" + "shared", "shared " + "DATA.md", "DESIGN" + ".md"]


def project_files() -> list[Path]:
    """Tracked files and new ones not ignored: what a commit of this working copy would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def test_no_file_of_the_project_refers_to_notes_outside_the_repository() -> None:
    references = []
    for path in project_files():
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
            references += [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for ref in OUTSIDE if ref in line]
    assert references == []


def test_the_architecture_the_readme_and_code_cite_is_in_the_repository() -> None:
    assert (REPO / "docs" / "architecture.md").is_file()
    assert "docs/architecture.md" in (REPO / "README.md").read_text()


def readme_settings_table() -> list[str]:
    """The variables named in the first cell of each row of the README's "Settings" table (a row may name two)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `GRAFT_")]
    return [name for row in rows for name in re.findall(r"`(GRAFT_[A-Z0-9_]+)`", row.split("|")[1])]


def test_every_setting_is_in_the_readme_table_and_every_row_is_a_setting() -> None:
    documented = readme_settings_table()
    settings = {f"GRAFT_{field.upper()}" for field in Settings.model_fields}
    assert sorted(settings - set(documented)) == [], "settings missing from the README's Settings table"
    assert sorted(set(documented) - settings) == [], "README Settings rows that are not fields of Settings"
    assert sorted(name for name in set(documented) if documented.count(name) > 1) == [], "rows listed twice"


def test_a_deprecation_warning_from_grafts_own_code_fails_the_run_and_a_third_partys_does_not(tmp_path: Path) -> None:
    """pyproject's filterwarnings: graft fixes its deprecated calls; it cannot fix BentoML's or torch's."""
    (tmp_path / "test_warnings.py").write_text(
        textwrap.dedent(
            """
        import pytest

        @pytest.mark.parametrize("module", ["service.engine.batcher", "adapters.heads", "client", "bentoml.metrics"])
        def test_warns_from(module):
            exec("import warnings; warnings.warn('old API', DeprecationWarning)", {"__name__": module})
        """
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(REPO),
            str(tmp_path / "test_warnings.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # failures are what it checks
    )
    failed = {line.split("[")[1].split("]")[0] for line in run.stdout.splitlines() if line.startswith("FAILED")}
    assert failed == {"service.engine.batcher", "adapters.heads", "client"}, run.stdout
    assert "1 passed" in run.stdout, run.stdout


def test_the_readme_screenshots_show_the_web_page_as_it_is() -> None:
    """The pictures under docs/screenshots record the digest of the page they show; any change to
    service/ui/static makes them stale until `make screenshots` takes them again."""
    recorded = (REPO / "docs" / "screenshots" / DIGEST_FILE).read_text().strip()
    assert recorded == static_digest(), "service/ui/static changed since the screenshots: run `make screenshots`"
