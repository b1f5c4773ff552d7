"""Typer options several commands share, defined once so their names and help agree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from llamactl.quantize import QuantSpec

# ---------------------------------------------------------------- quantization (quantize, chat, generate, bench)

Bits = Annotated[
    int | None,
    typer.Option("--bits", help="Quantize the block projections to 8 or 4 bits (default schemes: int8, nf4)."),
]
Scheme = Annotated[
    str | None,
    typer.Option("--scheme", help="A registered quantization scheme instead of --bits: int8, nf4, fp4 or a plugin's."),
]
QuantType = Annotated[str | None, typer.Option("--quant-type", help="4-bit data type: nf4 (default) or fp4.")]
DoubleQuant = Annotated[
    bool | None,
    typer.Option("--double-quant/--no-double-quant", help="Quantize the 4-bit scales too (default: on)."),
]
Blocksize = Annotated[int | None, typer.Option("--blocksize", help="4-bit block size (default 64).")]
ComputeDtype = Annotated[
    str | None, typer.Option("--compute-dtype", help="4-bit compute dtype: bf16 (default), fp16 or fp32.")
]
Int8Threshold = Annotated[
    float | None, typer.Option("--int8-threshold", help="LLM.int8 activation outlier threshold (default 6.0).")
]


def quant_from_options(
    bits: int | None,
    scheme: str | None,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    compute_dtype: str | None = None,
    threshold: float | None = None,
) -> QuantSpec | None:
    """The QuantSpec the quantization options describe (None: unquantized)."""
    from llamactl.quantize import get_scheme, parse_spec

    named = get_scheme(scheme) if scheme is not None else None
    return parse_spec(
        bits,
        named,
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype,
        threshold=threshold,
    )
