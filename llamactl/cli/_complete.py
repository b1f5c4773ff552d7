"""Shell-completion candidates for values: model names, presets, formats, dtypes.

The shipped scripts (completions/) ask `llamactl` itself at completion time, so these run on
every Tab: they read the store directory and the small tables, and never import torch.
"""

from __future__ import annotations


def _last_word(incomplete: str) -> tuple[str, str]:
    """('7b,', '1') for '7b,1': options that take comma lists complete their last item."""
    head, _, tail = incomplete.rpartition(",")
    return (head + "," if head else ""), tail


def model_names(incomplete: str) -> list[str]:
    """Names in the store first, then the known names `pull` can fetch (7b-chat ...)."""
    from llamactl.checkpoint import list_model_names
    from llamactl.pull import KNOWN_MODELS

    names = list(dict.fromkeys([*list_model_names(), *KNOWN_MODELS]))
    return [n for n in names if n.startswith(incomplete)]


def store_names(incomplete: str) -> list[str]:
    from llamactl.checkpoint import list_model_names

    return [n for n in list_model_names() if n.startswith(incomplete)]


def presets(incomplete: str) -> list[str]:
    from llamactl.config import PRESETS

    head, tail = _last_word(incomplete)
    return [head + p for p in PRESETS if p.startswith(tail)]


def writable_formats(incomplete: str) -> list[str]:
    """Formats `convert --to` writes plain weights to (bnb / native are `quantize`'s)."""
    from llamactl.checkpoint import formats

    return [n for n, f in formats().items() if f.write is not None and not f.schemes and n.startswith(incomplete)]


def float_dtypes(incomplete: str) -> list[str]:
    from llamactl.dtypes import FLOAT_NAMES

    head, tail = _last_word(incomplete)
    return [head + d for d in FLOAT_NAMES if d.startswith(tail)]
