"""The controller side of the install step: wheelhouse keys, platform tags, parallel builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import gevent
import pytest

from operations import install

PYTHON = {"version": "3.11", "machine": "x86_64", "glibc": "2.36"}


def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "nixcache").mkdir(parents=True)
    (root / "nixcache" / "__init__.py").write_text("__version__ = '0.1.0'\n")
    pins = "    # why\n    click==8.4.0\n    httpx==0.28.1\n"
    (root / "setup.cfg").write_text(f"[options]\ninstall_requires =\n{pins}")
    (root / "pyproject.toml").write_text("[build-system]\n")
    return root


def test_key_changes_with_the_sources_and_the_python(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    key = install.build_key(PYTHON, root)
    assert key.endswith("-py3.11-x86_64")
    (root / "nixcache" / "__pycache__").mkdir()
    (root / "nixcache" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert install.build_key(PYTHON, root) == key  # bytecode is not the checkout
    assert install.build_key({**PYTHON, "version": "3.12"}, root) != key
    (root / "nixcache" / "server.py").write_text("x = 1\n")
    assert install.build_key(PYTHON, root) != key
    changed = install.build_key(PYTHON, root)
    (root / "setup.cfg").write_text((root / "setup.cfg").read_text() + "    zstandard==0.25.0\n")
    assert install.build_key(PYTHON, root) != changed


def test_requirements_are_the_pins_of_setup_cfg(tmp_path: Path) -> None:
    assert install.requirements(checkout(tmp_path)) == ["click==8.4.0", "httpx==0.28.1"]


def test_platform_tags_accept_every_manylinux_up_to_the_hosts_glibc() -> None:
    tags = install.platform_tags("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags
    assert install.platform_tags("aarch64", "")[0] == "manylinux_2_17_aarch64"


def test_parallel_hosts_wait_for_one_build_without_stalling_gevent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyinfra prepares hosts in greenlets: the second must not block the hub while the first's
    subprocess runs (a blocking flock here once hung every deploy of two hosts or more)."""
    builds = []

    def slow_build(python, root, key, target):
        builds.append(key)
        # A real child process that gevent must reap while the other greenlets wait.
        assert gevent.subprocess.run(["sleep", "0.5"], check=False).returncode == 0
        target.mkdir(parents=True)
        (target / ".complete").write_text(key)

    monkeypatch.setattr(install, "_build", slow_build)
    root = checkout(tmp_path)
    cache = tmp_path / "cache"
    greenlets = [gevent.spawn(install.build_wheelhouse, PYTHON, root, cache) for _ in range(3)]
    gevent.joinall(greenlets, timeout=20)
    assert all(g.successful() for g in greenlets), [g.exception for g in greenlets]
    assert {g.value for g in greenlets} == {cache / install.build_key(PYTHON, root)}
    assert len(builds) == 1
    shutil.rmtree(cache)


def test_a_failed_build_step_names_the_step_the_error_and_the_command() -> None:
    argv = ["python3", "-c", "import sys; print('noise', file=sys.stderr); sys.exit('error: boom')"]
    with pytest.raises(install.WheelhouseError) as failure:
        install._run("building the nixcache wheel", argv)
    message = str(failure.value)
    assert message.startswith("wheelhouse: building the nixcache wheel failed (error: boom); run `python3 -c")
    assert "\n" not in message
