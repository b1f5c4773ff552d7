"""An OpenAI-compatible HTTP server over llamactl's models (`llamactl serve`).

- `worker.py`: `ModelWorker`, the thread that owns one model and its KV cache and runs one
  request at a time from a bounded queue, reusing the cached prefix of each prompt.
- `stops.py`: OpenAI's `stop` sequences over streamed text.
- `schemas.py`: the request models and response objects, OpenAI's shapes.
- `app.py`: the ASGI app (FastAPI): routes, errors, a request into a worker job;
  `front.py`: API key, body bound, request log; `respond.py`: JSON answers and server-sent events.
- `run.py`: listening socket and uvicorn, with SIGINT/SIGTERM cancelling what is in flight.

The HTTP parts need the `serve` extra (`pip install 'llamactl[serve]'`): FastAPI and uvicorn.
This module imports neither (nor torch) until a name is asked for, so `require_dependencies()`
can say what is missing in one line, and `llamactl serve` can bind its port before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from llamactl.errors import MissingDependencyError

REQUIRED = ("fastapi", "uvicorn")
_EXPORTS = {
    "ModelWorker": "worker",
    "Job": "worker",
    "Piece": "worker",
    "Finished": "worker",
    "Failed": "worker",
    "QueueFullError": "worker",
    "ShuttingDownError": "worker",
    "StopScanner": "stops",
    "ServedModel": "app",
    "ServerSettings": "app",
    "create_app": "app",
    "bind": "run",
    "run_server": "run",
}


def require_dependencies() -> None:
    """MissingDependencyError with the install hint unless FastAPI and uvicorn are installed."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"llamactl serve needs {' and '.join(missing)}: pip install 'llamactl[serve]'")


def __getattr__(name: str) -> Any:
    """The public names, imported from their module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [*sorted(_EXPORTS), "require_dependencies"]
