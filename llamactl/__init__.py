"""llamactl: convert, quantize, chat with and benchmark Llama-2-family models."""

from __future__ import annotations

__version__ = "0.1.0"
