"""docs/settings.md is generated from the declarations, and the tests fail while it is stale."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from nixcache.backup.config import BackupConfig
from nixcache.server.config import ServerConfig
from operations import settings_doc
from operations.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_docs_settings_md_is_up_to_date():
    done = subprocess.run(
        [sys.executable, "-m", "operations.settings_doc", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (REPO / "docs" / "settings.md").read_text() == settings_doc.render()


def test_every_key_has_a_row_with_its_reason():
    text = settings_doc.render()
    for cls in (Settings, ServerConfig, BackupConfig):
        for field in dataclasses.fields(cls):
            assert len(field.metadata["doc"]) > 15, f"{cls.__name__}.{field.name} has no reason"
            assert f"| `{field.name}` |" in text, field.name


def test_a_stale_document_is_reported_with_the_command_that_fixes_it(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "settings.md"
    stale.write_text(settings_doc.render().replace("| `cache_port` |", "| `cache_prot` |"))
    monkeypatch.setattr(settings_doc, "DOC", stale)
    assert settings_doc.main(["--check"]) == 1
    assert "run `python -m operations.settings_doc`" in capsys.readouterr().err
