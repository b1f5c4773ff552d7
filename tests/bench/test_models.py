"""llamactl.bench.models: random-weight models made on the device, shapes described without building."""

from __future__ import annotations

import pytest
import torch

from llamactl.bench import BenchOptions, plan_bench
from llamactl.bench.models import build_model, build_random_model, describe_model
from llamactl.engine.memory import weight_bytes
from llamactl.layout import param_count
from llamactl.model import Transformer
from tests.bench._util import CPU, TINY, tiny_options


def test_random_model_is_built_on_the_device_in_its_dtype() -> None:
    model = build_random_model(TINY, CPU, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.freqs_cis.dtype == torch.complex64
    torch.testing.assert_close(model.freqs_cis, Transformer(TINY).freqs_cis)  # to_empty left nothing uninitialised
    assert float(model.layers[0].attention.wq.weight.detach().float().std()) == pytest.approx(0.02, rel=0.1)


def test_the_described_shape_is_the_one_built() -> None:
    plan = plan_bench(tiny_options(attn=["gqa"], kv_heads=[2], layers=[1]), device=CPU)
    (key,) = plan.models
    shape = describe_model(plan, key)
    built = build_model(plan, key)
    assert built.shape == shape
    assert (shape.name, shape.filename, shape.full_layers, shape.bits, shape.dtype) == (
        "custom-64d",
        "",
        2,
        16,
        torch.float32,
    )
    assert (built.model.args.n_layers, built.model.args.kv_heads) == (1, 2)


def test_a_preset_is_described_without_building_it() -> None:
    plan = plan_bench(BenchOptions(presets=["70b"], layers=[3], dtypes=["bf16"]), device=CPU)
    shape = describe_model(plan, plan.models[0])
    assert (shape.name, shape.full_layers, shape.args.n_layers, shape.args.kv_heads) == ("70b", 80, 3, 8)
    assert shape.dtype == torch.bfloat16


def test_weight_bytes_are_the_parameters_as_held() -> None:
    model = build_random_model(TINY, CPU, torch.bfloat16)
    assert weight_bytes(model) == param_count(TINY) * 2
    model.fuse_projections()  # fused q|k|v and w1|w3: the same bytes, held differently
    assert weight_bytes(model) == param_count(TINY) * 2
