"""oneDNN-packed CPU linears: the same logits as nn.Linear, the same state_dict, tied heads left alone."""

from __future__ import annotations

import pytest
import torch

from llamactl.engine import choose_step
from llamactl.engine.packed import GemvLinear, PackedLinear, can_pack, one_row_as_gemv, pack_linears
from llamactl.model import Transformer
from tests._ckpt import random_meta_state, tiny_args


def _model(dtype: torch.dtype, tie: bool = False) -> Transformer:
    args = tiny_args()
    model = Transformer(args).eval()
    model.load_state_dict(random_meta_state(args, seed=4))
    if tie:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype).fuse_projections()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_computes_what_the_plain_one_does(dtype: torch.dtype) -> None:
    if not can_pack(dtype):
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype} weights")
    plain, packed = _model(dtype), _model(dtype)
    before = packed.state_dict()
    step = choose_step(packed, "eager")  # the eager CPU step packs
    kind = GemvLinear if one_row_as_gemv(dtype) else PackedLinear
    swapped = [m for m in packed.modules() if isinstance(m, kind)]
    assert len(swapped) == 2 * 4 + 1  # wqkv, wo, w13, w2 per layer, and the head
    tokens = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = plain(tokens), packed(tokens)
        plain.setup_cache(2, 16)
        packed.setup_cache(2, 16)
        plain(tokens, 0)
        packed(tokens, 0)
        next_want, next_got = plain(tokens[:, :1], 9), step(tokens[:, :1], 9)
    tolerance = 0 if dtype == torch.float32 else 0.05 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance + 1e-5
    assert (next_got - next_want).abs().max().item() <= tolerance + 1e-5
    after = packed.state_dict()  # Meta's names and tensors, unpacked on demand
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_tied_head_is_not_packed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.engine import packed

    monkeypatch.setattr(packed, "one_row_as_gemv", lambda _dtype: False)  # as where no native matvec is built
    model = _model(torch.float32, tie=True)
    assert pack_linears(model) == 2 * 4
    assert type(model.output) is torch.nn.Linear
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("native", [True, False])
def test_gemv_linear_computes_the_product_for_one_row_and_many(native: bool, dtype: torch.dtype) -> None:
    """One row through the native matvec (where built) or W @ x, more through F.linear: all the
    fp32 product of the values, rounded once (96 inputs: the native kernels' masked tails)."""
    linear = torch.nn.Linear(96, 42, bias=False).to(dtype)
    gemv = GemvLinear(linear)
    if native and not gemv.native:
        pytest.skip(f"no native {dtype} matvec on this CPU (AVX512-BF16 / AVX512F)")
    if not native:
        gemv.matvec = None  # W @ x, as where no native kernel is built
    assert gemv.weight is linear.weight and list(gemv.state_dict()) == ["weight"]
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    rtol, atol = (2**-7, 1e-3) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for rows in (x[:1, :1], x[1], x):
        want = (rows.double() @ linear.weight.double().t()).to(dtype)
        got = gemv(rows)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_a_tied_head_stays_one_tensor_as_gemv() -> None:
    if not one_row_as_gemv(torch.bfloat16):
        pytest.skip("one-row bf16 products stay packed on this CPU (no AVX512-BF16 matvec, no AMX)")
    model = _model(torch.bfloat16, tie=True)
    assert pack_linears(model) == 2 * 4 + 1
    assert type(model.output) is GemvLinear
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
