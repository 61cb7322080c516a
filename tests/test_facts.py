"""pyinfra-testing fact cases: tests/facts/<module>.<FactClass>/*.json|yaml (command output in, fact out)."""

from pathlib import Path

from pyinfra_testing.facts import make_fact_tests

BASE_IMPORT_PATH = "facts"
TESTS_BASE = Path(__file__).parent / "facts"

for _fact_path in sorted(d.name for d in TESTS_BASE.iterdir() if d.is_dir()):
    locals()[_fact_path] = make_fact_tests(BASE_IMPORT_PATH, _fact_path, TESTS_BASE / _fact_path)
