"""Render the files that land on hosts from the jinja2 templates in operations/templates/.

StrictUndefined: a template variable the caller forgot is an error here, on the controller,
never an empty value in a unit file on a host.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(  # noqa: S701 - renders config files, not HTML
        # Read with pathlib, not FileSystemLoader: pyinfra-testing patches os.path.isfile (which
        # FileSystemLoader checks) while an operation under test runs.
        loader=jinja2.FunctionLoader(lambda name: (TEMPLATES / name).read_text()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **variables: Any) -> str:
    """The text of `template` (a file name under operations/templates/) with `variables`."""
    return _environment().get_template(template).render(**variables)


def sha256(text: str | bytes) -> str:
    """Hex sha256 of `text`, as `sha256sum` prints it on the host."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()
