"""pyinfra-testing operation cases: tests/operations/<module>.<operation>/*.yaml (facts in, commands out)."""

from pathlib import Path

from pyinfra_testing.operations import make_operation_tests

BASE_IMPORT_PATH = "operations"
TESTS_BASE = Path(__file__).parent / "operations"

for _op_path in sorted(d.name for d in TESTS_BASE.iterdir() if d.is_dir()):
    locals()[_op_path] = make_operation_tests(BASE_IMPORT_PATH, _op_path, TESTS_BASE / _op_path)
