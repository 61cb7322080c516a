"""The optional nginx front (``cache_nginx_front``): TLS, HTTP/2, signed narinfos and NARs from disk."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import HiddenValue, deploy

from deploys.parts.base import apt_packages
from nixcache.packages import NGINX_FRONT_PACKAGES
from operations import nginx
from operations.settings import Settings, host_secret, settings


@deploy("nixcache nginx front")
def nginx_front(
    config: Settings | None = None, read_token: HiddenValue | None = None, serves_nix_store: bool = False
) -> None:
    """nginx with TLS before the cache when ``cache_nginx_front``; its site removed otherwise.

    `read_token`: the cache's (nginx lets its holders read from disk); `serves_nix_store`: the
    server answers narinfos from this host's Nix store, so nginx leaves narinfos to it."""
    s = config or settings()
    if not s.cache_nginx_front:
        nginx.absent(name="No nixcache site in nginx (cache_nginx_front is off)")
        return
    apt_packages("Install nginx and openssl", NGINX_FRONT_PACKAGES, s)
    address = host.data.get("ssh_hostname") or host.name
    alt_names = [f"IP:{address}"] if address.replace(".", "").isdigit() else [f"DNS:{address}"]
    nginx.tls(
        name="TLS certificate and key",
        common_name=host.name,
        cert=host_secret("TLS certificate", "tls_cert_ref", s.tls_cert_ref) if s.tls_cert_ref else None,
        key=host_secret("TLS key", "tls_key_ref", s.tls_key_ref) if s.tls_key_ref else None,
        alt_names=alt_names,
    )
    nginx.store_reader(name="nginx may read the store", store_dir=s.store_dir, service_group=s.service_user)
    nginx.site(
        name="nginx site for the cache",
        cache_port=s.cache_port,
        store_dir=s.store_dir,
        hits_log=nginx.hits_log(s.cache_data_dir),
        service_group=s.service_user,
        read_token=read_token,
        https_port=s.nginx_https_port,
        prefix=s.cache_accel_redirect_prefix,
        keepalive_timeout=s.nginx_keepalive_timeout,
        narinfo_from_disk=not serves_nix_store,
    )
