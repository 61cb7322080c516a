"""One declared route table: path pattern → route name → handler per method.

The route name labels the log line and the metrics; a path that matches a route but not its
method gets 405 with `Allow` built from the table (RFC 9110 15.5.6). Patterns are matched
against the whole percent-decoded path (`fullmatch`: `$` would also match before a final
newline, and `/<hash>.narinfo%0A` is no narinfo).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Route:
    name: str
    pattern: str  # a regular expression for the whole path; its groups are the handler's arguments
    handlers: Mapping[str, Handler]  # method -> handler(request, *groups)


class Resolved(NamedTuple):
    """The outcome of a lookup: a handler with its arguments, or none (then `allow` says which
    methods the path has, empty when no route knows the path). A tuple: made per request."""

    name: str
    handler: Handler | None
    groups: tuple[str, ...] = ()
    allow: str = ""


NOT_FOUND = Resolved("other", None)


class Router:
    def __init__(self, routes: Iterable[Route]):
        self.routes = [(re.compile(route.pattern), route) for route in routes]
        self._allow = {route.name: ", ".join(sorted(route.handlers)) for _, route in self.routes}

    def resolve(self, method: str, path: str) -> Resolved:
        """The first route (in declaration order) whose pattern matches the whole path."""
        for pattern, route in self.routes:
            match = pattern.fullmatch(path)
            if match is not None:
                handler = route.handlers.get(method)
                if handler is None:
                    return Resolved(route.name, None, (), self._allow[route.name])
                return Resolved(route.name, handler, match.groups())
        return NOT_FOUND
