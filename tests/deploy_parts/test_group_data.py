"""The `__all__` trap of group data files (operations/group_data.py): no setting is dropped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from operations import group_data

REPO = Path(__file__).resolve().parents[2]
GROUP_DATA = sorted((REPO / "inventories" / "group_data").glob("*.py"))


def test_the_repository_has_group_data_files():
    assert {"all", "lab", "production"} <= {path.stem for path in GROUP_DATA}


@pytest.mark.parametrize("path", GROUP_DATA, ids=lambda path: path.name)
def test_no_group_data_file_of_the_repository_drops_a_name(path: Path):
    assert group_data.problems(path) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the trap itself: a correctly spelled setting that pyinfra would never apply
        (
            '__all__ = []\ngc_min_free = "5G"\n',
            [
                "'gc_min_free' is not in __all__, so pyinfra drops it silently; add it to __all__ "
                "(or name it _gc_min_free if it is a helper)"
            ],
        ),
        # also when set inside an if block
        ('__all__ = ["a"]\na = 1\nif a:\n    b = 2\n', ["'b' is not in __all__"]),
        ('__all__ = ["a", "b"]\na = 1\n', ["__all__ lists 'b', which the file does not set"]),
        ('__all__ = sorted(["a"])\na = 1\n', ["__all__ is computed; write it as a literal list"]),
        # fine: helpers with a leading underscore, imports, or no __all__ at all
        ('import os\n__all__ = ["a"]\n_helper = os.sep\na = _helper\n', []),
        ('a = 1\nb = "x"\n', []),
    ],
)
def test_problems_name_the_file_and_the_name(tmp_path: Path, text: str, expected: list[str]):
    path = tmp_path / "production.py"
    path.write_text(text)
    found = group_data.problems(path)
    assert len(found) == len(expected)
    for message, part in zip(found, expected, strict=True):
        assert message.startswith(f"{path}: ") and part in message


def test_the_directories_are_those_pyinfra_reads(tmp_path: Path):
    dirs = group_data.directories("inventories/prod.py", str(tmp_path), ["extra"])
    assert dirs == [tmp_path / "group_data", tmp_path / "inventories" / "group_data", tmp_path / "extra"]
