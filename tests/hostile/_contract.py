"""The promise every hostile case is held to (README: bad input).

One line on stderr that starts `llamactl: error:` and names the culprit, the documented exit
code, no traceback, nothing half-written (no DST, no `.partial`, no staging left), the input
byte-identical, no payload run, nothing written outside the test's own temporary root.
"""

from __future__ import annotations

from pathlib import Path

from tests.cli._run import Outcome, tree_digest

# Every hostile test runs under this many seconds: a hang fails the test, not CI.
TIME_LIMIT_S = 20


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (what must be unchanged, or gone, afterwards)."""
    return tree_digest(root)


def assert_refused(
    outcome: Outcome,
    *fragments: str,
    code: int = 1,
    root: Path | None = None,
    before: dict[str, str] | None = None,
) -> None:
    """`outcome` is one clean error line; under `root` nothing changed from `before` (when given)."""
    assert outcome.exit_code == code, (outcome.exit_code, outcome.stderr)
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("llamactl: error: "), lines[0]
    assert "Traceback" not in outcome.stderr and "\x1b" not in outcome.stderr
    assert outcome.stdout == "", outcome.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if root is not None and before is not None:
        after = snapshot(root)
        assert after == before, sorted(set(after.items()) ^ set(before.items()))
        leftovers = [p for p in root.rglob("*") if ".partial" in p.name or p.name.startswith((".rm-", ".import-"))]
        assert leftovers == []
