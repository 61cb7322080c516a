"""The last deploy step: the cache answers /nix-cache-info, asked from the controller's side.

Asking from the controller proves what a client needs: the service runs, listens on the right
address and the firewall lets the controller's network in. The probe runs only while pyinfra
executes (never while it plans, so `--dry` asks nothing); a healthy cache yields no command, so
a converged host reports no change. An unhealthy one fails the step with one line naming the
host, the URL, what went wrong and where to look.
"""

from __future__ import annotations

import time

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, HiddenValue, operation

from nixcache.httpcompat import make_httpx_importable
from operations.settings import SERVICE_NAME, Settings

make_httpx_importable()  # before httpx: pyinfra's gevent patching breaks an installed trio
import httpx  # noqa: E402

# Pause between attempts: short, a gevent server is up within about a second of its start.
RETRY_PAUSE = 1.0


def probe(url: str, timeout: float, read_token: str | None = None) -> str | None:
    """None when `url` answers 200 with a StoreDir line within `timeout` seconds, else why not.
    `read_token`: a private cache's, sent as a Bearer token (a header, never in the URL)."""
    headers = {"Authorization": f"Bearer {read_token}"} if read_token else {}
    deadline = time.monotonic() + timeout
    problem = "no attempt made"
    attempts = max(1, int(timeout / RETRY_PAUSE) + 1)
    for _ in range(attempts):
        remaining = deadline - time.monotonic()
        try:
            response = httpx.get(url, headers=headers, timeout=max(0.5, min(5.0, remaining)))
            if response.status_code == 200 and "StoreDir:" in response.text:
                return None
            problem = f"answers HTTP {response.status_code}"
        except httpx.HTTPError as error:
            problem = f"does not answer ({type(error).__name__}: {error or 'no detail'})"
        if time.monotonic() + RETRY_PAUSE > deadline:
            break
        time.sleep(RETRY_PAUSE)
    return problem


def _fail(state, host, message: str) -> bool:  # pyinfra passes state and host to callbacks
    logger.error(f"{host.print_prefix}{message}")
    return False


def failed_step(message: str) -> FunctionCommand:
    """A command that fails its step at execution, logging `message` (host, problem and fix)."""
    return FunctionCommand(_fail, (message,), {})


@operation()
def cache_info(
    url: str,
    timeout: int = Settings.health_check_timeout,
    unit: str = SERVICE_NAME,
    read_token: HiddenValue | None = None,
):
    """`url` (…/nix-cache-info) answers within `timeout` seconds; checked at execution only.
    `read_token`: the cache's, when it has one (reads need it)."""
    if not host.state.is_executing:
        host.noop(f"{url} is checked when the deploy runs")
        return
    problem = probe(url, timeout, read_token.unmask() if read_token is not None else None)
    if problem is None:
        host.noop(f"{url} answers")
        return
    message = (
        f"{host.name}: nixcache {problem} at {url} after {timeout} s; "
        f"look at `journalctl -u {unit}` and `nft list ruleset` on the host"
    )
    yield failed_step(message)
