"""The optional nginx front: TLS, HTTP/2, keep-alive, NAR bytes from disk via X-Accel-Redirect.

The cache server stays the only judge of who may read what: nginx proxies every request to
it, and for an authorised `GET /nar/<file>` the server answers with an empty body and
`X-Accel-Redirect: <ACCEL_REDIRECT_PREFIX><file>`, which nginx serves from the store's `nar/`
directory through an `internal` location that clients cannot reach directly.
"""

from __future__ import annotations

import re
import shlex

from pyinfra import host
from pyinfra.api import HiddenValue, OperationValueError, StringCommand, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Users
from pyinfra.operations import systemd

from operations import hostfile
from operations.render import render
from operations.settings import Settings

# The internal location nginx serves NARs from; nixcache's config.toml names the same prefix
# (operations/config.py writes settings.cache_accel_redirect_prefix, whose default this is).
ACCEL_REDIRECT_PREFIX = Settings.cache_accel_redirect_prefix
SITE_FILE = "/etc/nginx/conf.d/nixcache.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
TLS_DIR = "/etc/nginx/nixcache-tls"
CERT_FILE = f"{TLS_DIR}/cert.pem"
KEY_FILE = f"{TLS_DIR}/key.pem"
NGINX_USER = "www-data"  # Debian's nginx worker user
NGINX_UNIT = "nginx.service"
# Self-signed certificates for the lab: P-256 (fast handshakes), valid 825 days (the longest
# validity clients accept for a leaf certificate).
SELF_SIGNED_DAYS = 825

# Applies new certificates or groups when nginx runs; does nothing when it does not (yet).
RELOAD = StringCommand(f"systemctl try-reload-or-restart {NGINX_UNIT}")

_PREFIX = re.compile(r"^/[A-Za-z0-9._\-/]*/$")


def render_site(
    cache_port: int,
    https_port: int,
    nar_dir: str,
    prefix: str = ACCEL_REDIRECT_PREFIX,
    keepalive_timeout: str = Settings.nginx_keepalive_timeout,
    ipv6: bool = True,
) -> str:
    """/etc/nginx/conf.d/nixcache.conf."""
    return render(
        "nginx-nixcache.conf.j2",
        cache_port=cache_port,
        https_port=https_port,
        nar_dir=nar_dir.rstrip("/"),
        prefix=prefix,
        keepalive_timeout=keepalive_timeout,
        cert_file=CERT_FILE,
        key_file=KEY_FILE,
        ipv6=ipv6,
    )


@operation()
def tls(
    common_name: str,
    cert: HiddenValue | str | None = None,
    key: HiddenValue | None = None,
    alt_names: list[str] | None = None,
):
    """The front's certificate and key: from data when given, else self-signed once on the host.

    + common_name: the host's name, the certificate's subject
    + cert, key: PEM chain and key (secret values); both or neither
    + alt_names: subjectAltName entries for a self-signed certificate (``DNS:…``, ``IP:…``)

    The self-signed key is generated on the host by openssl and never leaves it; it is kept
    on later runs, so clients that pinned it keep working.
    """
    if (cert is None) != (key is None):
        raise OperationValueError(f"{host.name}: give both tls_cert_ref and tls_key_ref or neither")
    if cert is not None and key is not None:
        # The directory is root's only: the key is written there with 0600 before any byte.
        changed = hostfile.differs(CERT_FILE, cert) or hostfile.differs(KEY_FILE, key)
        yield from _tls_dir()
        yield from hostfile.put._inner(CERT_FILE, cert, mode="0644")
        yield from hostfile.put._inner(KEY_FILE, key, mode="0600")
        if changed:
            yield RELOAD
        return
    if host.get_fact(File, path=CERT_FILE) and host.get_fact(File, path=KEY_FILE):
        host.noop(f"{CERT_FILE} exists (self-signed, kept)")
        return
    yield from _tls_dir()
    names = ",".join([f"DNS:{common_name}", *(alt_names or [])])
    yield StringCommand(
        f"(umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
        f"-days {SELF_SIGNED_DAYS} -subj {shlex.quote('/CN=' + common_name)} "
        f"-addext {shlex.quote('subjectAltName=' + names)} "
        f"-keyout {KEY_FILE} -out {CERT_FILE}.nixcache-new 2>/dev/null) "
        f"&& chmod 0644 {CERT_FILE}.nixcache-new && mv -f {CERT_FILE}.nixcache-new {CERT_FILE}"
    )
    yield RELOAD


def _tls_dir():
    info = host.get_fact(File, path=TLS_DIR)
    if info is None:
        yield StringCommand(f"install -d -m 0700 -o root -g root {TLS_DIR}")


@operation()
def store_reader(store_dir: str, service_group: str, user: str = NGINX_USER):
    """Let nginx's workers read the store: ``user`` joins the service's group.

    + store_dir: the store (its ``nar/`` is what nginx serves)
    + service_group: the group owning the store
    + user: nginx's worker user

    On the first run the store written so far is opened to the group (the service writes new
    files group-readable while the front is on: UMask=0027 in its unit).
    """
    users = host.get_fact(Users)
    if user not in users:
        raise OperationValueError(f"{host.name}: user {user} does not exist; install nginx-light first")
    if service_group in (users[user].get("groups") or []):
        host.noop(f"{user} is in group {service_group}")
        return
    yield StringCommand(f"usermod -a -G {shlex.quote(service_group)} {shlex.quote(user)}")
    yield StringCommand(f"chmod -R g+rX {shlex.quote(store_dir)}")
    yield RELOAD  # workers pick up the new group when they are re-forked


@operation()
def site(
    cache_port: int,
    nar_dir: str,
    https_port: int = Settings.nginx_https_port,
    prefix: str = ACCEL_REDIRECT_PREFIX,
    keepalive_timeout: str = Settings.nginx_keepalive_timeout,
):
    """nginx's nixcache site, checked by ``nginx -t``; nginx running and reloaded on change.

    + cache_port: the nixcache server's port on 127.0.0.1
    + nar_dir: the store's ``nar/`` directory
    + https_port: where clients connect
    + prefix: the X-Accel-Redirect location (must match the server's config)
    + keepalive_timeout: idle time of client connections

    Debian's default site (port 80, a welcome page) is disabled: the host serves the cache only.
    """
    # Checked before any fact is asked: the prefix goes into nginx's config and the server's.
    if not _PREFIX.match(prefix):
        raise OperationValueError(
            f"{host.name}: cache_accel_redirect_prefix={prefix!r} must start and end with '/' and hold "
            "only letters, digits, '.', '_', '-'; e.g. '/_nixcache_store/'"
        )
    ipv6 = bool(host.get_fact(File, path="/proc/net/if_inet6"))
    content = render_site(cache_port, https_port, nar_dir, prefix, keepalive_timeout, ipv6)
    default_site = host.get_fact(File, path=DEFAULT_SITE) is not None
    # A metadata-only fix (chown/chmod) needs no reload; new content or a removed default does.
    changed = default_site or hostfile.differs(SITE_FILE, content)
    if default_site:
        yield StringCommand(f"rm -f {DEFAULT_SITE}")
    yield from hostfile.put._inner(
        SITE_FILE,
        content,
        check="nginx -t -q",
        check_in_place=True,
        fix="fix the nginx_* and cache_accel_redirect_prefix host data (or the site's template), then rerun",
    )
    yield from systemd.service._inner(NGINX_UNIT, running=True, enabled=True, reloaded=changed)


@operation()
def absent():
    """No nixcache site in nginx (the front was turned off); nginx itself is left alone."""
    if not host.get_fact(File, path=SITE_FILE):
        host.noop(f"{SITE_FILE} is absent")
        return
    yield StringCommand(f"rm -f {SITE_FILE} && (systemctl reload {NGINX_UNIT} || true)")
