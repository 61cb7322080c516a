"""The runbook's convention as tests/support/runbook.py reads it, on sample text and on the real runbook."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.runbook import RunbookError, check, parse, placeholders, substitute, uncovered

from runbook.test_runbook_lab import PLACEHOLDERS

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"

SAMPLE = """\
# Title

## First

1. Look:
   ```sh
   pyinfra -y $INV exec --limit <host> -- hostname
   ```
   Expect: `[<host>] …` then `[<host>] Success`.
2. On the host:
   ```sh
   # on <host>
   nixcache secrets get x
   ```
   Expect (exit 3): `does not exist`, and no `Traceback`.

```python
# in group_data/<group>.py
gc_max_size = "1M"
```

## Second

Not executed: needs real hardware (a second disk).

```sh
mkfs /dev/sdb
```

```sh
mount /dev/sdb /mnt
```

## Third

```sh
echo hi
```
Not executed yet: being rewritten.

```text
an example output block, not a step
```
"""


def test_sample_steps_where_they_run_and_what_they_expect() -> None:
    steps = parse(SAMPLE)
    assert [s.id for s in steps] == ["First #1", "First #2", "First #3", "Second #1", "Second #2", "Third #1"]
    look, on_host, edit = steps[:3]
    assert look.where == "controller" and look.script == "pyinfra -y $INV exec --limit <host> -- hostname"
    assert look.expect.exit_code == 0 and look.expect.fragments == [
        (True, "[<host>] …"),
        (True, "[<host>] Success"),
    ]
    assert on_host.where == "<host>" and on_host.script == "nixcache secrets get x"
    assert on_host.expect.exit_code == 3
    assert on_host.expect.fragments == [(True, "does not exist"), (False, "Traceback")]
    assert (
        edit.kind == "edit" and edit.target == "group_data/<group>.py" and edit.script == 'gc_max_size = "1M"'
    )


def test_marks_apply_to_a_step_or_to_a_whole_section() -> None:
    steps = {s.id: s for s in parse(SAMPLE)}
    assert steps["Second #1"].not_executed == "needs real hardware (a second disk)."
    assert steps["Second #2"].not_executed == "needs real hardware (a second disk)."
    assert steps["Third #1"].not_executed == "being rewritten."
    assert steps["First #1"].not_executed is None


def test_a_step_without_expect_fails_naming_it() -> None:
    text = "## Broken\n\n```sh\necho hi\n```\nIt prints hi.\n"
    with pytest.raises(RunbookError, match=r"line 3: step Broken #1 has no Expect line"):
        parse(text)


def test_an_expect_line_outside_the_convention_fails() -> None:
    text = "## Old\n\n```sh\necho hi\n```\nExpect `hi` twice.\n"
    with pytest.raises(RunbookError, match=r"step Old #1: 'Expect `hi` twice.'… is not an Expect line"):
        parse(text)


def test_an_expect_line_quoting_nothing_fails() -> None:
    with pytest.raises(RunbookError, match="quotes nothing"):
        parse("## Vague\n\n```sh\necho hi\n```\nExpect: it works.\n")


def test_a_placeholder_without_a_mapping_fails() -> None:
    assert (
        substitute("ssh <host> at <addr>", {"host": "lab1", "addr": "10.0.0.2"}, "x")
        == "ssh lab1 at 10.0.0.2"
    )
    with pytest.raises(RunbookError, match=r"First #1: no lab value for <client>, <key name>"):
        substitute("deploy <client> with <key name>", {}, "First #1")
    # Shell redirections are not placeholders.
    assert placeholders("put <ref> < /dev/shm/key > out 2>&1") == ["ref"]


def test_an_unmarked_step_that_was_not_executed_fails_coverage() -> None:
    steps = parse(SAMPLE)
    assert uncovered(steps, {"First #1", "First #2", "First #3"}) == []
    missing = uncovered(steps, {"First #1", "First #3"})
    assert missing == ["First #2 (line 11) was not executed and is not marked `Not executed: …`"]
    assert (
        "Second #1 (line 26) is marked"
        in uncovered(steps, {"First #1", "First #2", "First #3", "Second #1"})[0]
    )


def test_check_fragments_in_order_with_wildcards_and_absences() -> None:
    expect = parse(SAMPLE)[0].expect
    values = {"host": "lab1"}
    assert check(expect, values, 0, "[lab1] lab1\n[lab1] Success\n", "s") == []
    # in order: Success before the host line does not count for the second fragment
    assert check(expect, values, 0, "[lab1] Success\n", "s") == [
        "no `[lab1] Success` after the previous fragment"
    ]
    assert check(expect, values, 1, "[lab1] x\n[lab1] Success", "s") == ["exit 1, expected 0"]
    # `…` stays within one line
    wild = parse("## W\n\n```sh\nx\n```\nExpect: `a … c`\n")[0].expect
    assert check(wild, {}, 0, "a b c", "s") == []
    assert check(wild, {}, 0, "a b\nc", "s") == ["no `a … c`"]
    absent = parse(SAMPLE)[1].expect
    problems = check(absent, {}, 3, "does not exist\nTraceback (most recent call last)", "s")
    assert problems == ["`Traceback` appears but must not: 'Traceback'"]


def test_the_runbook_follows_the_convention_and_every_placeholder_has_a_lab_value() -> None:
    steps = parse(RUNBOOK.read_text())
    executed = [s for s in steps if s.not_executed is None]
    assert executed, "the runbook test would execute nothing"
    for step in executed:
        texts = [
            step.script,
            step.target,
            step.where,
            *(f for _, f in (step.expect.fragments if step.expect else [])),
        ]
        for name in placeholders(" ".join(texts)):
            assert name in PLACEHOLDERS, f"{step.id}: <{name}> has no lab value in the runbook test"
    for step in steps:
        if step.not_executed is not None:
            assert len(step.not_executed) > 10, f"{step.id}: say why it is not executed"
