"""Data for every host of every inventory: overrides of operations/settings.py that hold everywhere.

Defaults, and the reason for each, live in operations/settings.py; environment-specific values in
the per-environment files beside this one (lab.py, production.py, staging.py, …). Nothing needs
overriding for every host today: keep it that way unless a value truly is fleet-wide.
"""

__all__: list[str] = []
