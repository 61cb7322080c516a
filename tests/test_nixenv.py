"""nixcache.nixenv: every Nix call the project makes for itself ignores the machine's settings."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from conftest import require

from nixcache import nixenv


def show_config(home: Path) -> dict[str, str]:
    done = nixenv.run(["nix", "show-config"], home)
    assert done.returncode == 0, done.stderr
    return dict(line.split(" = ", 1) for line in done.stdout.splitlines() if " = " in line)


@pytest.fixture
def hostile_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine whose own nix.conf would break every build and send lookups outside."""
    require(shutil.which("nix") is not None, "nix missing (apt-get install nix-bin)")
    conf = tmp_path / "etc-nix"
    conf.mkdir()
    (conf / "nix.conf").write_text(
        "build-users-group = no-such-group\nsubstituters = http://192.0.2.1\nsandbox = true\n"
    )
    monkeypatch.setenv("NIX_CONF_DIR", str(conf))
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    return conf


def test_machine_settings_are_not_read(hostile_machine: Path, tmp_path: Path) -> None:
    config = show_config(tmp_path / "home")
    assert config["build-users-group"] == ""
    assert config["substituters"] == ""
    assert config["sandbox"] == "false"
    assert "nix-command" in config["experimental-features"].split()


def test_extra_settings_override(tmp_path: Path) -> None:
    require(shutil.which("nix") is not None, "nix missing (apt-get install nix-bin)")
    done = nixenv.run(["nix", "show-config"], tmp_path / "home", {"require-sigs": "false"})
    assert "require-sigs = false\n" in done.stdout


def test_build_works_without_a_nixbld_group(hostile_machine: Path, tmp_path: Path) -> None:
    """Builds as the caller, whatever groups exist: Debian's nix-bin creates no nixbld group."""
    require(shutil.which("nix-build") is not None, "nix-build missing (apt-get install nix-bin)")
    salt = uuid.uuid4().hex
    path = nixenv.build(
        f'derivation {{ name = "nixenv-{salt[:8]}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo {salt} > $out" ]; }}',
        tmp_path / "work",
    )
    assert Path(path).read_text() == f"{salt}\n"


def test_build_failure_names_the_expression_and_nix_reason(tmp_path: Path) -> None:
    require(shutil.which("nix-build") is not None, "nix-build missing (apt-get install nix-bin)")
    with pytest.raises(nixenv.BuildError, match=r"closure\.nix failed \(exit 1\): .*undefined variable"):
        nixenv.build("this-is-not-defined", tmp_path / "work")
