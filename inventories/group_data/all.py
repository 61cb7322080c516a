"""Data for every host of every inventory: only overrides of operations/settings.py belong here.

Defaults, and the reason for each, live in operations/settings.py; environment-specific values
in the per-environment files beside this one.
"""

# Deploys connect as root with a key unless an inventory says otherwise.
ssh_user = "root"
