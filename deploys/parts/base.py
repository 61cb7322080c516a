"""Base of every cache host: packages, admin users, sshd, kernel tuning, file limits."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, server

from nixcache.packages import CACHE_HOST_PACKAGES
from operations import hardening
from operations.settings import Settings, SettingsError, settings

# Debian's adduser default NAME_REGEX: a name any tool on the host accepts.
USER_NAME = re.compile(r"^[a-z][-a-z0-9_]*$")


def admin_users(host_name: str, value: Any) -> list[dict[str, Any]]:
    """``admin_users`` checked and normalised to ``[{"name", "ssh_keys", "sudo"}]``.

    Raises :class:`SettingsError` naming the host, the entry and the fix.
    """
    if not isinstance(value, list | tuple):
        raise SettingsError(
            f"{host_name}: host data 'admin_users' is {type(value).__name__}; "
            'give a list of {"name": …, "ssh_keys": [...], "sudo": bool}'
        )
    users = []
    for index, entry in enumerate(value):
        where = f"{host_name}: host data 'admin_users[{index}]'"
        if not isinstance(entry, dict):
            raise SettingsError(
                f'{where} is not a mapping; give {{"name": …, "ssh_keys": [...], "sudo": bool}}'
            )
        unknown = set(entry) - {"name", "ssh_keys", "sudo"}
        if unknown:
            raise SettingsError(f"{where} has unknown keys {sorted(unknown)}; use name, ssh_keys and sudo")
        name = entry.get("name")
        if not isinstance(name, str) or not USER_NAME.match(name) or name == "root":
            raise SettingsError(
                f"{where} name {name!r} is not a valid login; use lower-case letters, "
                "digits, - and _, starting with a letter (not root)"
            )
        keys = entry.get("ssh_keys", [])
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list | tuple) or not all(isinstance(k, str) and k.strip() for k in keys):
            raise SettingsError(f"{where} ssh_keys must be a list of public key lines; fix {name}'s entry")
        for key in keys:
            if key.strip().startswith("-----BEGIN") or "PRIVATE KEY" in key:
                raise SettingsError(
                    f"{where} ssh_keys holds a private key; give {name}'s public key "
                    "(the .pub file) and treat that private key as leaked"
                )
        sudo = entry.get("sudo", False)
        if not isinstance(sudo, bool):
            raise SettingsError(f"{where} sudo is {sudo!r}; give True or False")
        users.append({"name": name, "ssh_keys": [k.strip() for k in keys], "sudo": sudo})
    names = [u["name"] for u in users]
    if len(set(names)) != len(names):
        raise SettingsError(
            f"{host_name}: host data 'admin_users' names a user twice; keep one entry per user"
        )
    return users


def apt_packages(name: str, packages: Iterable[str], s: Settings) -> None:
    """Install Debian `packages`; package lists are refreshed only when host data asks (apt_update)."""
    apt.packages(
        name=name,
        packages=list(packages),
        update=s.apt_update,
        # At most daily: a refresh counts as a change, and a rerun should report none.
        cache_time=86400,
        no_recommends=True,
    )


def check_root_login(host_name: str, permit_root_login: str, users: list[dict[str, Any]]) -> None:
    """Refuse to close root login when no admin could log in and use sudo afterwards."""
    if permit_root_login == "no" and not any(u["sudo"] and u["ssh_keys"] for u in users):
        raise SettingsError(
            f"{host_name}: host data 'ssh_permit_root_login' is 'no' but no admin_users entry has "
            "sudo and an SSH key, so nobody could administer the host; add one or keep 'prohibit-password'"
        )


@deploy("nixcache base: packages, admins, sshd, kernel, limits")
def base(config: Settings | None = None) -> None:
    """Packages, admin users with keys and sudo, hardened sshd, network sysctls, file limits."""
    s = config or settings()
    users = admin_users(host.name, s.admin_users)
    check_root_login(host.name, s.ssh_permit_root_login, users)

    apt_packages("Install the cache host packages", CACHE_HOST_PACKAGES, s)
    for user in users:
        server.user(  # noqa: S604 - `shell` is the admin's login shell, not a subprocess
            name=f"Admin user {user['name']}",
            user=user["name"],
            shell="/bin/bash",
            create_home=True,
            public_keys=user["ssh_keys"],
            # The data is the whole truth: a key removed from data is removed from the host.
            delete_keys=True,
        )
    hardening.sudoers(name="sudo for admin users", users=[u["name"] for u in users if u["sudo"]])
    hardening.sshd(name="Harden sshd", permit_root_login=s.ssh_permit_root_login)
    hardening.kernel_tuning(name="Kernel network tuning", values=dict(s.sysctl_overrides))
    hardening.file_limits(name="File limits", soft=s.nofile_soft_limit, hard=s.nofile_hard_limit)
