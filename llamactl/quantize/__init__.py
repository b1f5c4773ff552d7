"""Weight-only quantization: one QuantSpec, registered schemes, and a backend per method.

The spec (`spec.py`) and the quantized-tensor type (`tensor.py`) import no kernels, so
metadata commands stay fast; a scheme's backend (bitsandbytes: `bnb.py`; the native q8 / q4
schemes: `native.py`) loads when a weight is actually quantized, restored or run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

from llamactl.errors import UsageError
from llamactl.layout import Shape, is_quantizable, meta_to_hf, module_path
from llamactl.plugins import get_registry
from llamactl.quantize.spec import DEFAULT_SCHEME_FOR_BITS, SCHEMES, QuantSpec, parse_spec
from llamactl.quantize.tensor import Backend, Layout, QuantizedTensor

__all__ = [
    "DEFAULT_SCHEME_FOR_BITS",
    "SCHEMES",
    "Backend",
    "Layout",
    "QuantSpec",
    "QuantizedTensor",
    "backend",
    "fits",
    "get_scheme",
    "matches_skip",
    "parse_spec",
    "quantizable_names",
    "storage",
]


def backend(spec: QuantSpec) -> Backend:
    """The implementation of `spec`'s method (imported on first use: it brings torch and kernels)."""
    if spec.method == "native":
        from llamactl.quantize.native import BACKEND as NATIVE

        return NATIVE
    if spec.method == "bitsandbytes":
        from llamactl.quantize.bnb import BACKEND

        return BACKEND
    raise UsageError(f"quantization scheme {spec.scheme!r}: no backend for method {spec.method!r}")


def storage(spec: QuantSpec) -> Layout:
    """How `spec`'s method stores weights (sizes and part names; torch-free)."""
    if spec.method == "native":
        from llamactl.quantize import native_layout

        return native_layout  # type: ignore[return-value]
    if spec.method == "bitsandbytes":
        from llamactl.quantize import bnb_layout

        return bnb_layout  # type: ignore[return-value]
    raise UsageError(f"quantization scheme {spec.scheme!r}: no storage layout for method {spec.method!r}")


def get_scheme(name: str) -> QuantSpec:
    """A registered scheme by name: q8, q4, int8, nf4, fp4 or a plugin's QuantSpec."""
    schemes = get_registry().quantizers()
    if name not in schemes:
        raise UsageError(f"quantization scheme {name!r}: unknown; choose one of: {', '.join(sorted(schemes))}")
    spec = schemes[name]
    if not isinstance(spec, QuantSpec):
        raise UsageError(
            f"quantization scheme {name!r}: registered as {type(spec).__name__}, not a llamactl.quantize.QuantSpec"
        )
    return dataclasses.replace(spec).validate()


def matches_skip(meta_name: str, patterns: Sequence[str]) -> list[str]:
    """The skip patterns (fnmatch) that match a tensor, by Meta name, HF name or module name."""
    hf = meta_to_hf(meta_name) or ""
    names = {meta_name, module_path(meta_name), hf, hf.removesuffix(".weight")}
    return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names if n)]


def fits(spec: QuantSpec, shape: Shape) -> bool:
    """Whether `spec` can store a weight of this shape (native blocks need in % group == 0)."""
    return storage(spec).supports(spec, shape)


def quantizable_names(names: Sequence[str], skip: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """(to quantize, skipped by a pattern, patterns that matched nothing) among tensor names."""
    chosen, skipped, used = [], [], set()
    for name in names:
        if not is_quantizable(name):
            continue
        hits = matches_skip(name, skip)
        used.update(hits)
        (skipped if hits else chosen).append(name)
    return chosen, skipped, [p for p in skip if p not in used]
