"""The end-to-end fixtures of tests/deploy (a converged lab) for the monitoring lab tests."""

from deploy.conftest import deployed, lab_dir  # noqa: F401 - pytest fixtures
