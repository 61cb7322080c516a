"""Nix clients of the cache: substituters, trusted keys and a netrc, in files nixcache owns.

nixcache never rewrites the client's /etc/nix/nix.conf: it appends one
``!include /etc/nix/nixcache.conf`` line and keeps its settings in that file. Nix reads the
include where the line stands, and the last value of a setting wins, so the line goes last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pyinfra import host
from pyinfra.api import HiddenValue, OperationValueError, StringCommand, operation
from pyinfra.facts.files import File
from pyinfra.operations import files, systemd

from nixcache.keys import KeyFormatError
from operations import hostfile, rotation
from operations.settings import SettingsError, from_data

NIX_CONF = "/etc/nix/nix.conf"
CLIENT_CONF = "/etc/nix/nixcache.conf"
NETRC_FILE = "/etc/nix/nixcache-netrc"
NIX_DAEMON_UNIT = "nix-daemon.service"
# Seconds Nix waits to connect to a cache: a cache that is down costs each build this much
# once, not the TCP default of minutes.
CONNECT_TIMEOUT = 5
# The user name Nix presents with the read token (the server checks only the password).
NETRC_LOGIN = "nixcache"


@dataclass(frozen=True)
class Cache:
    """One cache as a client sees it."""

    url: str
    public_key: str | None = None
    read_token: HiddenValue | None = None


def is_client(s: Any) -> bool:
    """Whether host settings `s` make the host a Nix client of the fleet (it names its caches)."""
    return bool(s.client_caches or s.client_cache_group)


def is_cache(s: Any) -> bool:
    """Whether a host with settings `s` is a cache (deploys/cache.py's host): every host but a client.

    "Adding a client" puts clients in the same inventory as the caches; a host that names caches
    is their client, and deploys/cache.py must not make it one more cache.
    """
    return not is_client(s)


def cache_url(address: str, data: Any) -> str:
    """The URL clients use for a cache host: https through the nginx front, else http to the server."""
    s = from_data(address, data)
    if s.cache_nginx_front:
        port = "" if s.nginx_https_port == 443 else f":{s.nginx_https_port}"
        return f"https://{address}{port}"
    return f"http://{address}:{s.cache_port}"


def public_key_of(host_name: str, data: Any, resolve) -> str:
    """The public key of a cache host, derived from the secret key its ``signing_key_ref`` names."""
    ref = data.get("signing_key_ref")
    if not ref:
        raise SettingsError(
            f"{host_name}: host data 'signing_key_ref' is not set, so clients cannot learn "
            "its public key; set it or list the key in trusted_public_keys"
        )
    try:
        # Two keys, space-separated, while a rotation introduces the next one (operations/rotation.py).
        return " ".join(rotation.trusted_public_keys(host_name, data, resolve))
    except KeyFormatError as error:
        raise SettingsError(
            f"{host_name}: the signing key at {ref} is not a Nix secret key ({error}); "
            "fix the secret or deploy the cache first"
        ) from None


def render_nix_conf(substituters: list[str], trusted_public_keys: list[str], netrc: bool) -> str:
    """/etc/nix/nixcache.conf."""
    lines = [
        "# Managed by nixcache (deploys/client.py); included from /etc/nix/nix.conf, local edits are "
        "overwritten.\n",
        "# Caches in the order Nix tries them: this fleet's caches first, then the upstreams in data.\n",
        f"substituters = {' '.join(substituters)}\n",
        "# Signatures Nix accepts on what it substitutes.\n",
        f"trusted-public-keys = {' '.join(trusted_public_keys)}\n",
        "# A cache that is down is skipped after this many seconds instead of stalling builds.\n",
        f"connect-timeout = {CONNECT_TIMEOUT}\n",
    ]
    if netrc:
        lines += ["# Read tokens of private caches (root-only file).\n", f"netrc-file = {NETRC_FILE}\n"]
    return "".join(lines)


def render_netrc(caches: list[Cache]) -> str:
    """netrc entries for the caches that need a read token; the result is a secret."""
    entries = []
    for cache in caches:
        if cache.read_token is None:
            continue
        machine = urlsplit(cache.url).hostname
        token = cache.read_token.unmask() if isinstance(cache.read_token, HiddenValue) else cache.read_token
        entries.append(f"machine {machine} login {NETRC_LOGIN} password {token}\n")
    return "".join(entries)


@operation()
def nix_conf(
    substituters: list[str],
    trusted_public_keys: list[str],
    netrc: HiddenValue | str | None = None,
):
    """Point Nix at the caches; restart nix-daemon (where it exists) when the settings changed.

    + substituters: cache URLs, in the order Nix should try them
    + trusted_public_keys: ``name:base64`` keys Nix accepts signatures from
    + netrc: the netrc text (secret) for private caches, or None for none
    """
    if not substituters:
        raise OperationValueError(
            f"{host.name}: no cache to configure; set client_caches or client_cache_group in host data"
        )
    for url in substituters:
        if urlsplit(url).scheme not in ("http", "https", "file", "s3", "ssh", "ssh-ng") or " " in url:
            raise OperationValueError(
                f"{host.name}: substituter {url!r} is not a cache URL; give e.g. http://cache.example:5000"
            )
    netrc_text = netrc.unmask() if isinstance(netrc, HiddenValue) else netrc
    conf = render_nix_conf(substituters, trusted_public_keys, bool(netrc_text))
    # Anything but an owner or mode fix changes what Nix reads.
    changed = hostfile.differs(CLIENT_CONF, conf)
    yield from hostfile.put._inner(CLIENT_CONF, conf)
    if netrc_text:
        changed |= hostfile.differs(NETRC_FILE, netrc_text)
        yield from hostfile.put._inner(NETRC_FILE, netrc_text, mode="0600")
    elif host.get_fact(File, path=NETRC_FILE):
        changed = True
        yield StringCommand(f"rm -f {NETRC_FILE}")
    include = list(files.line._inner(path=NIX_CONF, line=f"!include {CLIENT_CONF}"))
    changed |= bool(include)
    yield from include
    # The daemon reads nix.conf once, at start: restarted where it runs (pyinfra restarts only a
    # running unit, so hosts without nix-daemon are left alone).
    yield from systemd.service._inner(NIX_DAEMON_UNIT, running=None, restarted=changed)


def caches_for(host_name: str, s: Any, inventory: Any, resolve) -> list[Cache]:
    """The caches a client uses, in order, from its settings ``s``.

    ``client_caches`` (URLs) wins; their read token is the client's own ``read_token_ref``.
    Otherwise every host of the inventory group ``client_cache_group``, in inventory order,
    with its URL, the public key of its signing key and its read token when it has one.
    ``resolve`` turns a secret reference into its value (nixcache.secrets.resolve).
    """
    if s.client_caches:
        token = HiddenValue(resolve(s.read_token_ref)) if s.read_token_ref else None
        return [Cache(url=url.rstrip("/"), read_token=token) for url in s.client_caches]
    if not s.client_cache_group:
        raise SettingsError(
            f"{host_name}: neither 'client_caches' nor 'client_cache_group' is set; name the "
            "caches (URLs) or the inventory group of cache hosts"
        )
    members = list(inventory.get_group(s.client_cache_group, []))
    if not members:
        raise SettingsError(
            f"{host_name}: inventory group {s.client_cache_group!r} (client_cache_group) has no "
            "hosts; use the group that holds your cache hosts"
        )
    caches = []
    for member in members:
        address = member.data.get("ssh_hostname") or member.name
        token_ref = member.data.get("read_token_ref")
        caches.append(
            Cache(
                url=cache_url(address, member.data),
                public_key=public_key_of(member.name, member.data, resolve),
                read_token=HiddenValue(resolve(token_ref)) if token_ref else None,
            )
        )
    return caches
