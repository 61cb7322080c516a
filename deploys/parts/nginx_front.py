"""The optional nginx front (``cache_nginx_front``): TLS, HTTP/2, NAR bytes from disk."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from deploys.parts.base import apt_packages
from nixcache.packages import NGINX_FRONT_PACKAGES
from operations import nginx
from operations.settings import Settings, host_secret, settings


@deploy("nixcache nginx front")
def nginx_front(config: Settings | None = None) -> None:
    """nginx with TLS before the cache when ``cache_nginx_front``; its site removed otherwise."""
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
        nar_dir=f"{s.store_dir}/nar",
        https_port=s.nginx_https_port,
        prefix=s.cache_accel_redirect_prefix,
        keepalive_timeout=s.nginx_keepalive_timeout,
    )
