"""Read docs/runbook.md as the test executes it: steps, where they run, what they must print.

The convention is stated at the top of the runbook itself ("How this runbook is tested"); in short:

- a step is a fenced ```sh block; it runs on the controller, or on a host when its first line is
  `# on <host>`;
- a ```python block whose first line is `# in <path>` is a data edit: its lines are appended to
  that file (relative to the inventory's directory);
- the paragraph after a step that starts `Expect:` (or `Expect (exit N):`) holds its check, up
  to its first `:` or `.` outside backticks (the rest is prose): every `backticked` fragment
  must appear in the output, in that order; `…` in a fragment stands for any text on one line,
  or none; `no `x`` means x must not appear anywhere;
- `Not executed: <reason>` (or `Not executed yet: <reason>`) after a block marks that step, and
  right under a heading every step of that section;
- `<name>` is a placeholder: the test maps each to a lab value, and one without a mapping fails.

Nothing here runs anything: `parse` and `check` are plain functions, unit-tested on sample text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PLACEHOLDER = re.compile(r"<([a-z][a-z0-9_ .-]*)>")
_HEADING = re.compile(r"^(#{2,3})\s+(.+?)\s*$")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_ON_HOST = re.compile(r"^#\s*on\s+(\S.*?)\s*$")
_EDIT = re.compile(r"^#\s*in\s+(\S.*?)\s*$")
_EXPECT = re.compile(r"^Expect(?:\s+\(exit\s+(\d+)\))?:\s*(.*)$", re.S)
_NOT_EXECUTED = re.compile(r"^Not executed(?: yet)?:\s*(.+)$", re.S)
_FRAGMENT = re.compile(r"(\bno\s+)?`([^`]+)`")


class RunbookError(Exception):
    """The runbook breaks its own convention; the message names the step, its line and the fix."""


@dataclass
class Expect:
    """What a step must print: fragments in order (present=True) and ones that must be absent."""

    exit_code: int
    fragments: list[tuple[bool, str]]
    line: int


@dataclass
class Step:
    section: str
    number: int  # 1-based within its section
    line: int  # of the opening fence, 1-based
    kind: str  # "command" or "edit"
    script: str  # the block's text, without its `# on …` / `# in …` line
    where: str = "controller"  # "controller", or the host placeholder of `# on <host>`
    target: str = ""  # an edit's file
    expect: Expect | None = None
    not_executed: str | None = None  # the reason, when the runbook marks the step
    expect_text: tuple[int, str] | None = None  # (line, paragraph) of its Expect line, as written

    @property
    def id(self) -> str:
        return f"{self.section} #{self.number}"


@dataclass
class _Section:
    title: str
    not_executed: str | None = None
    steps: list[Step] = field(default_factory=list)


def _paragraphs(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(first line number, text) of each blank-line-separated paragraph; list markers stripped."""
    paragraphs, current, start = [], [], 0
    for number, text in [*lines, (0, "")]:
        stripped = text.strip()
        if re.match(r"(?:[-*]|\d+\.)\s", stripped) and current:  # a list item starts a paragraph
            paragraphs.append((start, " ".join(current)))
            current = []
        if not stripped:
            if current:
                paragraphs.append((start, " ".join(current)))
            current = []
            continue
        if not current:
            start = number
            stripped = re.sub(r"^(?:[-*]|\d+\.)\s+", "", stripped)
        current.append(stripped)
    return paragraphs


def _check_part(text: str) -> str:
    """The check of an Expect line: up to its first `:` or `.` outside backticks; the rest is prose."""
    quoted = False
    for index, char in enumerate(text):
        if char == "`":
            quoted = not quoted
        elif char in ":." and not quoted and text[index + 1 : index + 2] in ("", " "):
            return text[:index]
    return text


def _expect(step: Step, number: int, text: str) -> Expect:
    match = _EXPECT.match(text)
    if not match:
        raise RunbookError(
            f"runbook line {number}: step {step.id}: {text[:40]!r}… is not an Expect line of the "
            "convention; write `Expect: `fragment` …` or `Expect (exit N): …`"
        )
    fragments = [
        (not negated, fragment) for negated, fragment in _FRAGMENT.findall(_check_part(match.group(2)))
    ]
    if not fragments:
        raise RunbookError(
            f"runbook line {number}: step {step.id}: its Expect line quotes nothing to look for; "
            "put what the output must contain in backticks"
        )
    return Expect(int(match.group(1) or 0), fragments, number)


def _close(step: Step, trailer: list[tuple[int, str]]) -> None:
    """Read the prose after a step's block: its Expect paragraph and its Not executed mark."""
    for number, text in _paragraphs(trailer):
        if text.startswith("Expect") and step.expect_text is None:
            step.expect_text = (number, text)
        elif (marked := _NOT_EXECUTED.match(text)) and step.not_executed is None:
            step.not_executed = marked.group(1).strip()


def parse(text: str) -> list[Step]:
    """Every step of the runbook, in order. RunbookError when an executed step breaks the convention."""
    sections: list[_Section] = [_Section("(top)")]
    lines = text.splitlines()
    index, trailer, preamble, open_step = 0, [], [], None

    def finish() -> None:
        if open_step is not None:
            _close(open_step, trailer)
        elif preamble and not sections[-1].steps and len(sections) > 1:
            for _, paragraph in _paragraphs(preamble):
                if marked := _NOT_EXECUTED.match(paragraph):
                    sections[-1].not_executed = marked.group(1).strip()

    while index < len(lines):
        line = lines[index]
        heading = _HEADING.match(line)
        fence = _FENCE.match(line)
        if heading:
            finish()
            open_step, trailer, preamble = None, [], []
            sections.append(_Section(heading.group(2)))
        elif fence:
            finish()
            preamble = []
            start, (indent, language) = index + 1, fence.groups()
            body, index = [], index + 1
            while index < len(lines) and not _FENCE.match(lines[index]):
                body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
                index += 1
            if index == len(lines):
                raise RunbookError(f"runbook line {start}: a ``` block is never closed; close it")
            open_step, trailer = _block(sections[-1], language, body, start), []
        elif open_step is None and not sections[-1].steps:
            preamble.append((index + 1, line))
        else:
            trailer.append((index + 1, line))
        index += 1
    finish()
    steps = []
    for section in sections:
        for step in section.steps:
            if step.not_executed is None and section.not_executed is not None:
                step.not_executed = section.not_executed
            if step.kind == "command" and step.not_executed is None:
                if step.expect_text is None:
                    raise RunbookError(
                        f"runbook line {step.line}: step {step.id} has no Expect line; say what it "
                        "prints (`Expect: `…``), or mark it `Not executed: <reason>`"
                    )
                step.expect = _expect(step, *step.expect_text)
            steps.append(step)
    return steps


def _block(section: _Section, language: str, body: list[str], line: int) -> Step | None:
    """The step a fenced block makes (None for blocks that are neither commands nor edits)."""
    first = body[0].strip() if body else ""
    number = len(section.steps) + 1
    if language == "sh":
        on_host = _ON_HOST.match(first)
        script = "\n".join(body[1:] if on_host else body).strip()
        where = on_host.group(1) if on_host else "controller"
        step = Step(section.title, number, line, "command", script, where=where)
    elif language == "python" and (edit := _EDIT.match(first)):
        step = Step(section.title, number, line, "edit", "\n".join(body[1:]).strip(), target=edit.group(1))
    else:
        return None
    section.steps.append(step)
    return step


def placeholders(text: str) -> list[str]:
    """The placeholder names in `text`, in order of first appearance."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def substitute(text: str, values: dict[str, str], what: str) -> str:
    """`text` with each `<name>` replaced by values[name]; RunbookError naming those unmapped."""
    missing = [name for name in placeholders(text) if name not in values]
    if missing:
        names = ", ".join(f"<{name}>" for name in missing)
        raise RunbookError(
            f"{what}: no lab value for {names}; add it to the runbook test's placeholder table"
        )
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def _pattern(fragment: str) -> re.Pattern[str]:
    # `…` is any text on the line, or none: "a … b" matches "a b", "a xyz b" and "ab".
    parts = re.split(r"\s*…\s*", fragment)
    return re.compile(r"[^\n]*?".join(re.escape(part) for part in parts))


def check(expect: Expect, values: dict[str, str], exit_code: int, output: str, what: str) -> list[str]:
    """What is wrong with a step's exit code and output against its Expect line (empty: it passed)."""
    problems = []
    if exit_code != expect.exit_code:
        problems.append(f"exit {exit_code}, expected {expect.exit_code}")
    position = 0
    for present, fragment in expect.fragments:
        wanted = substitute(fragment, values, f"{what}, Expect line {expect.line}")
        found = _pattern(wanted).search(output, position if present else 0)
        if present and found is None:
            problems.append(f"no `{wanted}`" + (" after the previous fragment" if position else ""))
        elif present:
            position = found.end()
        elif found is not None:
            problems.append(f"`{wanted}` appears but must not: {found.group(0)!r}")
    return problems


def uncovered(steps: list[Step], executed: set[str]) -> list[str]:
    """Steps that are neither executed nor marked, and marked steps that were executed anyway."""
    problems = []
    for step in steps:
        if step.not_executed is None and step.id not in executed:
            problems.append(
                f"{step.id} (line {step.line}) was not executed and is not marked `Not executed: …`"
            )
        elif step.not_executed is not None and step.id in executed:
            problems.append(f"{step.id} (line {step.line}) is marked `Not executed` but the test ran it")
    return problems
