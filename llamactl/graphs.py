"""Compatibility for `llamactl.bench`, which still imports `decode_step` from here.

Decode steps live in `llamactl.engine` now and are chosen once, at load. This shim chooses
one per model on first use (remembered beside the model, never on it) until bench takes a
step from the loader; delete it then.
"""

from __future__ import annotations

import weakref

import torch

from llamactl.engine import DecodeStep, choose_step
from llamactl.model import Transformer

_STEPS: weakref.WeakKeyDictionary[Transformer, DecodeStep] = weakref.WeakKeyDictionary()


def decode_step(model: Transformer, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    """Logits [B,1,V] for tokens [B,1] at position pos through the step chosen for `model`."""
    step = _STEPS.get(model)
    if step is None:
        step = _STEPS[model] = choose_step(model)
    return step(tokens, pos)
