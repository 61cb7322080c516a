"""The one exception the lab raises: its message is the whole one-line error a person sees."""

from __future__ import annotations


class LabError(Exception):
    """A lab failure with a one-line message naming the thing, the cause and the fix."""

    exit_code = 1


class LabNotUpError(LabError):
    """The lab has no state (or no running host) in the state directory."""

    exit_code = 3


class UnknownHostError(LabError):
    """A host name that is not part of this lab."""

    exit_code = 2


class PrerequisiteError(LabError):
    """Not root, or a required tool is missing."""

    exit_code = 4
