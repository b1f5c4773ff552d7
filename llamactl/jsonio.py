"""JSON from files we did not write: every failure is one ValueError with a one-line reason.

`json.loads` has three ways to fail besides JSONDecodeError: RecursionError for deep nesting
(`[[[[...` 100k deep), ValueError for an integer longer than Python converts (4300 digits),
and a hook's own error. Callers catching ValueError (and naming their file) see them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llamactl.errors import printable


def loads(text: str | bytes, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse JSON; raise ValueError('malformed JSON: ...') for anything that is not valid, bounded JSON."""
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"malformed JSON: {printable(str(exc))[:120]}") from None
