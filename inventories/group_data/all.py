"""Data for every host of every inventory: overrides of operations/settings.py that hold everywhere.

Defaults, and the reason for each, live in operations/settings.py; environment-specific values in
the per-environment files beside this one (lab.py, production.py, staging.py, …). Nothing needs
overriding for every host today: keep it that way unless a value truly is fleet-wide.
`fleet_domain` (read by inventories/prod.py) belongs here too.
"""

# No `__all__` here: pyinfra exports every name this file sets, so a setting added below is never
# dropped silently (operations/group_data.py refuses a file whose __all__ would drop one).
