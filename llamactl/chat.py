"""Compatibility: `llamactl.store` (not part of this change) imports TEMPLATE_NAME from here.

Dialogs and chat templates live in `llamactl.templates`; delete this module once store
imports `DEFAULT_TEMPLATE` from there.
"""

from __future__ import annotations

from llamactl.templates import DEFAULT_TEMPLATE as TEMPLATE_NAME

__all__ = ["TEMPLATE_NAME"]
