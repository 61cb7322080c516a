"""The optional nginx front: TLS, HTTP/2, keep-alive, and what needs no decision served from disk.

nginx answers signed narinfos (`<store>/signed/`) and NAR GETs (`<store>/nar/`) itself, opening
the file (absent or unreadable: `error_page` hands the request to the server; no `try_files`,
whose existence check costs a stat per hit), for readers whose `Authorization` field is one the
deploy rendered into READERS_FILE (an nginx `map`: no subrequest per request); everything else
goes to the server,
which stays the judge of misses, uploads, other credentials and the local Nix store. For NAR
reads it still answers (other credentials) it hands the bytes back with
`X-Accel-Redirect: <ACCEL_REDIRECT_PREFIX><file>`, served from an `internal` location.

nginx writes its disk hits to HITS_LOG (fixed format), which the server reads to record "last
served" for gc and to count them in /metrics (nixcache/server/front.py).

nginx keeps the descriptors of the files it serves open between requests (`open_file_cache`),
which needs more open files per worker than Debian's 1,024: MAIN_FILE raises the limit from the
main context without editing Debian's nginx.conf.
"""

from __future__ import annotations

import base64
import re
import shlex

from pyinfra import host
from pyinfra.api import HiddenValue, OperationValueError, StringCommand, operation
from pyinfra.facts.files import File
from pyinfra.facts.server import Users
from pyinfra.operations import systemd

from operations import hostfile
from operations.client import NETRC_LOGIN
from operations.render import render
from operations.settings import Settings

# The internal location nginx serves NARs from; nixcache's config.toml names the same prefix
# (operations/config.py writes settings.cache_accel_redirect_prefix, whose default this is).
ACCEL_REDIRECT_PREFIX = Settings.cache_accel_redirect_prefix
SITE_FILE = "/etc/nginx/conf.d/nixcache.conf"
DEFAULT_SITE = "/etc/nginx/sites-enabled/default"
# Main-context settings (worker_rlimit_nofile): Debian's nginx.conf includes modules-enabled/*.conf
# in its main context, conf.d/*.conf only inside http {}.
MAIN_FILE = "/etc/nginx/modules-enabled/90-nixcache.conf"
# Descriptors each worker may hold: the soft and hard limit each worker sets for itself. At most
# the hard limit nginx's master inherits (systemd's default: 524288), or the worker cannot set
# it (without CAP_SYS_RESOURCE, in some containers) and stays at 1,024 with a cache sized for
# more; 16,384 is within what hosts and containers commonly allow.
WORKER_FILES = 16384
# Debian's nginx.conf: each connection proxied to the server holds two descriptors.
DEBIAN_WORKER_CONNECTIONS = 768
# Files each of the two disk locations (signed/, nar/: one open_file_cache each) may keep open:
# what the limit leaves after the connections and a margin for logs, TLS files and upstreams.
OPEN_FILE_CACHE_MAX = (WORKER_FILES - 2 * DEBIAN_WORKER_CONNECTIONS - 1024) // 2
# Seconds nginx may serve a cached descriptor before it checks the file's name again: a file gc
# or verify deleted, or a push or key rotation replaced (by rename), may be served that long.
OPEN_FILE_CACHE_VALID = 1
TLS_DIR = "/etc/nginx/nixcache-tls"
CERT_FILE = f"{TLS_DIR}/cert.pem"
KEY_FILE = f"{TLS_DIR}/key.pem"
# The accepted Authorization values (they hold the read token): read by nginx's master, which
# runs as root, so root-only; never under conf.d (only the site includes it).
READERS_FILE = "/etc/nginx/nixcache-readers.conf"
# Where nginx logs the hits it served from disk (nixcache.server.front reads and empties it);
# in the cache's data dir, which the service may write (ReadWritePaths).
HITS_LOG_NAME = "front-hits.log"
NGINX_USER = "www-data"  # Debian's nginx worker user
NGINX_UNIT = "nginx.service"
# Self-signed certificates for the lab: P-256 (fast handshakes), valid 825 days (the longest
# validity clients accept for a leaf certificate).
SELF_SIGNED_DAYS = 825

# Applies new certificates or groups when nginx runs; does nothing when it does not (yet).
RELOAD = StringCommand(f"systemctl try-reload-or-restart {NGINX_UNIT}")

_PREFIX = re.compile(r"^/[A-Za-z0-9._\-/]*/$")
# Characters a Bearer token may have to be written into nginx's map as it is.
_BEARER_SAFE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")


def render_readers(read_token: str | None) -> str:
    """READERS_FILE: the nginx map of `Authorization` values that may read from disk.

    No read token: everyone is a reader. Otherwise the token as a Bearer and as the HTTP Basic
    password of the login the client deploy writes into netrc (NETRC_LOGIN); any other value
    (another login, the push token, a wrong token) goes to the server, which decides.
    """
    lines = [
        "# Rendered by nixcache's deploy (operations/nginx.py); local edits are overwritten.",
        "map $http_authorization $nixcache_reader {",
    ]
    if read_token is None:
        lines.append("    default ok;")
    else:
        keys = ["Basic " + base64.b64encode(f"{NETRC_LOGIN}:{read_token}".encode()).decode()]
        if _BEARER_SAFE.match(read_token):
            keys.append(f"Bearer {read_token}")
        # nginx's map hash needs a bucket that holds its longest key (default 64 bytes).
        bucket = max(64, 1 << (max(map(len, keys)) + 32).bit_length())
        lines.insert(1, f"map_hash_bucket_size {bucket};")
        lines += ["    default unknown;", '    "" anonymous;', *(f'    "{key}" ok;' for key in keys)]
    return "\n".join([*lines, "}", ""])


def render_main() -> str:
    """MAIN_FILE: nginx's main-context settings for the front (the workers' open files)."""
    return render(
        "nginx-nixcache-main.conf.j2", worker_files=WORKER_FILES, open_file_cache_max=OPEN_FILE_CACHE_MAX
    )


def hits_log(data_dir: str) -> str:
    """The front's hits log for a cache whose data dir is `data_dir`."""
    return f"{data_dir.rstrip('/')}/{HITS_LOG_NAME}"


def render_site(
    cache_port: int,
    https_port: int,
    store_dir: str,
    hits_log: str,
    prefix: str = ACCEL_REDIRECT_PREFIX,
    keepalive_timeout: str = Settings.nginx_keepalive_timeout,
    ipv6: bool = True,
    narinfo_from_disk: bool = True,
    readers_file: str = READERS_FILE,
) -> str:
    """/etc/nginx/conf.d/nixcache.conf; `narinfo_from_disk` False when the server serves the
    host's own Nix store (it answers narinfos from Nix's database first)."""
    return render(
        "nginx-nixcache.conf.j2",
        cache_port=cache_port,
        https_port=https_port,
        store_dir=store_dir.rstrip("/"),
        hits_log=hits_log,
        prefix=prefix,
        keepalive_timeout=keepalive_timeout,
        cert_file=CERT_FILE,
        key_file=KEY_FILE,
        ipv6=ipv6,
        narinfo_from_disk=narinfo_from_disk,
        readers_file=readers_file,
        main_file=MAIN_FILE,
        worker_files=WORKER_FILES,
        open_file_cache_max=OPEN_FILE_CACHE_MAX,
        open_file_cache_valid=OPEN_FILE_CACHE_VALID,
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
    store_dir: str,
    hits_log: str,
    service_group: str,
    read_token: HiddenValue | None = None,
    https_port: int = Settings.nginx_https_port,
    prefix: str = ACCEL_REDIRECT_PREFIX,
    keepalive_timeout: str = Settings.nginx_keepalive_timeout,
    narinfo_from_disk: bool = True,
):
    """nginx's nixcache site, checked by ``nginx -t``; nginx running and reloaded on change.

    + cache_port: the nixcache server's port on 127.0.0.1
    + store_dir: the store (nginx serves its ``signed/`` and ``nar/``)
    + hits_log: where nginx logs what it served from disk (the server reads and empties it)
    + service_group: the service's group (it must write the hits log)
    + read_token: the cache's read token (a secret), None for a public cache
    + https_port: where clients connect
    + prefix: the X-Accel-Redirect location (must match the server's config)
    + keepalive_timeout: idle time of client connections
    + narinfo_from_disk: False when the server serves the host's own Nix store

    Debian's default site (port 80, a welcome page) is disabled: the host serves the cache only.
    MAIN_FILE (the workers' open files) is installed with the site, and a change to it reloads
    nginx as well: new workers take the new limit.
    """
    # Checked before any fact is asked: the prefix goes into nginx's config and the server's.
    if not _PREFIX.match(prefix):
        raise OperationValueError(
            f"{host.name}: cache_accel_redirect_prefix={prefix!r} must start and end with '/' and hold "
            "only letters, digits, '.', '_', '-'; e.g. '/_nixcache_store/'"
        )
    ipv6 = bool(host.get_fact(File, path="/proc/net/if_inet6"))
    content = render_site(
        cache_port, https_port, store_dir, hits_log, prefix, keepalive_timeout, ipv6, narinfo_from_disk
    )
    token = read_token.unmask() if read_token is not None else None
    readers = HiddenValue(render_readers(token), masked_value="<nginx map of the read token>")
    main = render_main()
    default_site = host.get_fact(File, path=DEFAULT_SITE) is not None
    # A metadata-only fix (chown/chmod) needs no reload; new content or a removed default does.
    changed = (
        default_site
        or hostfile.differs(SITE_FILE, content)
        or hostfile.differs(READERS_FILE, readers)
        or hostfile.differs(MAIN_FILE, main)
    )
    if default_site:
        yield StringCommand(f"rm -f {DEFAULT_SITE}")
    # Before the site, whose open_file_cache needs the room it makes.
    yield from hostfile.put._inner(
        MAIN_FILE,
        main,
        check="nginx -t -q",
        check_in_place=True,
        fix="fix operations/templates/nginx-nixcache-main.conf.j2 (nginx -t names the line), then rerun",
    )
    # Before the site that includes it; root-only: it holds the read token.
    yield from hostfile.put._inner(READERS_FILE, readers, mode="0600")
    yield from _hits_log(hits_log, service_group)
    yield from hostfile.put._inner(
        SITE_FILE,
        content,
        check="nginx -t -q",
        check_in_place=True,
        fix="fix the nginx_* and cache_accel_redirect_prefix host data (or the site's template), then rerun",
    )
    yield from systemd.service._inner(NGINX_UNIT, running=True, enabled=True, reloaded=changed)


def _hits_log(path: str, group: str):
    """The hits log exists before nginx opens it (as root, which would make it root's 0644),
    group-writable by the service, which empties it. Its owner is left alone: nginx's master
    chowns the file to its worker user whenever it reopens logs (Debian's daily logrotate)."""
    info = host.get_fact(File, path=path)
    if info is None:
        yield StringCommand(f"install -m 0660 -o root -g {shlex.quote(group)} /dev/null {shlex.quote(path)}")
        return
    if info.get("group") != group:
        yield StringCommand(f"chgrp {shlex.quote(group)} {shlex.quote(path)}")
    if info.get("mode") != 660:
        yield StringCommand(f"chmod 0660 {shlex.quote(path)}")


@operation()
def absent():
    """No nixcache site in nginx (the front was turned off); nginx itself is left alone."""
    if not host.get_fact(File, path=SITE_FILE):
        host.noop(f"{SITE_FILE} is absent")
        return
    yield StringCommand(
        f"rm -f {SITE_FILE} {READERS_FILE} {MAIN_FILE} && (systemctl reload {NGINX_UNIT} || true)"
    )
