"""QuantSpec and the one parser of the quantization options every command shares."""

from __future__ import annotations

import pytest

from llamactl.errors import ConfigError, UsageError
from llamactl.quantize import QuantSpec, parse_spec


def test_bits_pick_the_default_schemes() -> None:
    assert parse_spec() is None
    assert parse_spec(8) == QuantSpec("q8")
    assert parse_spec(4) == QuantSpec("q4")
    assert parse_spec(4, quant_type="nf4") == QuantSpec("nf4")
    assert parse_spec(4, quant_type="fp4", blocksize=128, double_quant=False) == QuantSpec(
        "fp4", blocksize=128, double_quant=False
    )


def test_a_named_scheme_is_refined_by_the_options() -> None:
    assert parse_spec(scheme=QuantSpec("nf4"), compute_dtype="float16") == QuantSpec("nf4", compute_dtype="fp16")
    assert parse_spec(scheme=QuantSpec("int8"), threshold=4.0) == QuantSpec("int8", threshold=4.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits 3: unsupported; choose one of: 8, 4"),
        ({"bits": 8, "quant_type": "fp4"}, "quant type applies to 4-bit schemes only"),
        ({"bits": 4, "quant_type": "int4"}, "quant type 'int4': unsupported"),
        ({"bits": 8, "blocksize": 64}, "blocksize applies to bitsandbytes 4-bit schemes"),
        ({"bits": 4, "threshold": 5.0}, "int8 threshold applies to int8 only, not q4"),
        ({"bits": 4, "quant_type": "nf4", "blocksize": 48}, "32, 64, 128"),
        ({"blocksize": 64}, "blocksize needs bits or a scheme"),
        ({"bits": 4, "scheme": QuantSpec("nf4")}, "either bits or a scheme"),
    ],
)
def test_contradictions_are_usage_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_spec(**kwargs)  # type: ignore[arg-type]


def test_hf_config_round_trip_and_refusals() -> None:
    for spec in (QuantSpec("int8", threshold=5.0), QuantSpec("nf4", double_quant=False, compute_dtype="fp16")):
        back = QuantSpec.from_hf_config(spec.to_hf_config())
        assert (back.scheme, back.double_quant, back.compute_dtype, back.threshold) == (
            spec.scheme,
            spec.double_quant,
            spec.compute_dtype,
            spec.threshold,
        )
    with pytest.raises(ConfigError, match="quantization method 'gptq' is not supported"):
        QuantSpec.from_hf_config({"quant_method": "gptq"})
    with pytest.raises(ConfigError, match="must be an object"):
        QuantSpec.from_hf_config("bnb")
    with pytest.raises(ConfigError, match="bad quantization_config"):
        QuantSpec.from_hf_config(QuantSpec("int8").to_hf_config() | {"llm_int8_threshold": "abc"})


def test_the_spec_module_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, llamactl.quantize.spec, llamactl.quantize.bnb_layout; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
