"""Secret values wrapped so pyinfra never prints them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nixcache.secrets.api import resolve

if TYPE_CHECKING:
    from pyinfra.api import HiddenValue


def resolve_hidden(ref: str) -> HiddenValue:
    """Resolve `ref` into a pyinfra HiddenValue (masked in output; `.unmask()` gives the value).

    pyinfra is imported here, not at module level, because cache hosts install nixcache without it.
    """
    from pyinfra.api import HiddenValue

    return HiddenValue(resolve(ref), masked_value=f"<secret {ref}>")
