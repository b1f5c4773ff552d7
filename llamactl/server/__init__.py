"""An OpenAI-compatible HTTP server over llamactl's models (`llamactl serve`).

- `worker.py`: `ModelWorker`, the thread that owns one model and its KV cache and runs one
  request at a time from a bounded queue, reusing the cached prefix of each prompt.
- `stops.py`: OpenAI's `stop` sequences over streamed text.
- `schemas.py`: the request models and response objects, OpenAI's shapes.
- `app.py`: the ASGI app (FastAPI): routes, API key, body bound, errors, server-sent events.
- `run.py`: listening socket and uvicorn, with SIGINT/SIGTERM cancelling what is in flight.

The HTTP parts need the `serve` extra (`pip install 'llamactl[serve]'`): FastAPI and uvicorn.
This module imports neither, so `require_dependencies()` can say so in one line first.
"""

from __future__ import annotations

import importlib.util

from llamactl.errors import MissingDependencyError
from llamactl.server.stops import StopScanner
from llamactl.server.worker import Failed, Finished, Job, ModelWorker, Piece, QueueFullError, ShuttingDownError

REQUIRED = ("fastapi", "uvicorn")


def require_dependencies() -> None:
    """MissingDependencyError with the install hint unless FastAPI and uvicorn are installed."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"llamactl serve needs {' and '.join(missing)}: pip install 'llamactl[serve]'")


__all__ = [
    "Failed",
    "Finished",
    "Job",
    "ModelWorker",
    "Piece",
    "QueueFullError",
    "ShuttingDownError",
    "StopScanner",
    "require_dependencies",
]
