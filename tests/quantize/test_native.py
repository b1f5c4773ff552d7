"""The native q8 / q4 schemes: GGUF's bytes exactly, kernels against dequantize-then-matmul.

Oracles: gguf-py's own `quants.quantize` / `dequantize` (the reference implementation of
ggml-quants.c in numpy) for the stored bytes, and a plain fp32 matmul of the dequantized
weight for every kernel. Tolerances (relative to the largest reference output):
q4 int4 kernels 1e-2 (bf16 activations and scales), q8 2e-2 (weights re-quantized per row,
and for one-row inputs 8-bit activations too).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamactl.cpu import matvec
from llamactl.errors import UsageError
from llamactl.generate import decode_one, prefill
from llamactl.loading import load_model, quantize_model
from llamactl.quantize import QuantSpec, backend, fits, parse_spec, storage
from llamactl.quantize.native import BACKEND, KERNELS, NativeLinear, dequantize_blocks, quantize_blocks
from llamactl.quantize.native_layout import ggml_type, logical_shape, part_infos, spec_for_ggml
from llamactl.quantize.tensor import QuantizedTensor
from llamactl.rotary import permute_for_hf
from llamactl.sampling import greedy

CPU = torch.device("cpu")
GGML = {"q8": gguf.GGMLQuantizationType.Q8_0, "q4": gguf.GGMLQuantizationType.Q4_0}
# of the largest output: kernels that quantize activations to 8 bits (fbgemm, int8-rows' per-row
# weights, the vnni ones) 2e-2; the exact-value ones (int4-cpu, int8-split, dequantized) 1e-2
EIGHT_BIT_X_TOLERANCE, EXACT_TOLERANCE = 2e-2, 1e-2


def default_kernel(scheme: str, in_features: int) -> str:
    """The CPU kernel a bf16-compute weight gets: the vnni matvec where this machine builds it (and
    the blocks are GGUF's 32), else torch's (fbgemm / tinygemm)."""
    bits = QuantSpec(scheme).bits
    if matvec.available(bits, torch.bfloat16) and in_features % matvec.BLOCK == 0:
        return f"{scheme}-vnni"
    return "int8-fbgemm" if scheme == "q8" else "int4-cpu"


def awkward_weight(rows: int = 96, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Random weights plus the blocks that trip roundings: zeros, ties, outliers, halves."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block: d = 0
    w[1, 3] = -w[1].abs().max() * 4  # a negative outlier sets Q4_0's signed max
    w[2, 32:64] = torch.linspace(-1, 1, 32)  # +-max tie: the first one wins
    w[3, 64:96] = torch.arange(32) * 0.5 - 8  # values landing on .5 after scaling
    w[4] *= 1e-6  # tiny scales (fp16 subnormals)
    return w


@pytest.mark.parametrize("scheme", ["q8", "q4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_are_ggufs_bytes(scheme: str, dtype: torch.dtype) -> None:
    w = awkward_weight().to(dtype)
    ours = quantize_blocks(w, QuantSpec(scheme)).numpy()
    theirs = gguf.quants.quantize(w.float().numpy(), GGML[scheme])
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert np.array_equal(
        dequantize_blocks(torch.from_numpy(theirs), QuantSpec(scheme)).numpy(),
        gguf.quants.dequantize(theirs, GGML[scheme]),
    )


def _reference_blocks(w: np.ndarray, g: int) -> np.ndarray:
    """Q4_0's rule (gguf-py) on blocks of g: d = max / -8, u = trunc(w / d + 8.5), nibbles j | j+g/2."""
    blocks = w.reshape(-1, g).astype(np.float32)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)
    d = top / -8
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    u = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    packed = u[:, : g // 2] | (u[:, g // 2 :] << np.uint8(4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], -1)
    return out.reshape(w.shape[0], -1)


@pytest.mark.parametrize("group", [64, 128])
def test_q4_wider_groups_follow_the_same_rule(group: int) -> None:
    w = awkward_weight()
    spec = QuantSpec("q4", group_size=group)
    packed = quantize_blocks(w, spec)
    assert np.array_equal(packed.numpy(), _reference_blocks(w.numpy(), group))
    assert packed.shape == (96, 256 // group * (2 + group // 2))
    assert ggml_type(spec) is None and ggml_type(QuantSpec("q4")) == 2 and ggml_type(QuantSpec("q8")) == 8


def test_layout_contract() -> None:
    """Sizes and names from the shape alone; the GGUF reader's lookups."""
    q4, q8 = QuantSpec("q4"), QuantSpec("q8")
    assert [(i.name, i.shape, i.dtype) for i in part_infos(q4, "m", (172, 64))] == [("m.weight", (172, 36), "uint8")]
    assert storage(q8).stored_bytes(q8, (32, 64)) == 32 * 2 * 34
    assert logical_shape(q8, (32, 68), "x") == (32, 64)
    assert spec_for_ggml(2) == q4 and spec_for_ggml(8) == q8
    assert fits(q4, (172, 64)) and not fits(q4, (64, 172)) and fits(QuantSpec("nf4"), (64, 172))


@pytest.mark.parametrize("scheme", ["q8", "q4"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_match_dequantize_then_matmul(scheme: str, kernel: str) -> None:
    if (
        "cuda" in kernel
        or (kernel.startswith("int4") and scheme == "q8")
        or (kernel.startswith("int8") and scheme == "q4")
        or (kernel.endswith("-vnni") and not kernel.startswith(scheme))
    ):
        pytest.skip(f"{kernel} does not run {scheme} on the CPU")
    if kernel.endswith("-vnni") and not matvec.available(QuantSpec(scheme).bits, torch.bfloat16):
        pytest.skip(f"{kernel}: this CPU (or compiler) has no AVX512-VNNI")
    # 72 rows: the int4 CPU pack pads to a multiple of 16. The per-row kernels re-quantize each
    # row to one scale, which the awkward outlier rows would defeat: they get plain weights.
    # The vnni kernels quantize activations to 8 bits per block of 32 (as llama.cpp does): the
    # awkward rows' outliers meet x's rounding, so they are held to the 8-bit tolerance too.
    per_row = kernel in ("int8-fbgemm", "int8-rows")
    eight_bit_x = per_row or kernel.endswith("-vnni")
    w = torch.randn(72, 256) * 0.05 if per_row else awkward_weight(rows=72)
    tensor = BACKEND.quantize(w, QuantSpec(scheme), None, CPU)
    module = NativeLinear(tensor, CPU, kernel)
    reference = BACKEND.dequantize(tensor, torch.float32)
    g = torch.Generator().manual_seed(1)  # seeded: an unseeded draw made the test depend on the suite's order
    for rows in (1, 7):
        x = torch.randn(2, rows, 256, generator=g)
        want = x @ reference.T
        got = module(x)
        assert got.shape == want.shape and got.dtype == x.dtype
        tolerance = EIGHT_BIT_X_TOLERANCE if eight_bit_x else EXACT_TOLERANCE
        assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_q8_prefill_gives_every_token_its_own_activation_scale() -> None:
    """fbgemm quantizes a whole input with one scale; a prefill row 10^4 times larger than the
    others must not coarsen them (with one scale they would round to zero: a 100% error). Each
    row's error, relative to that row, stays within 5%, as a decode step of that row alone."""
    g = torch.Generator().manual_seed(2)
    tensor = BACKEND.quantize(torch.randn(64, 256, generator=g) * 0.05, QuantSpec("q8"), None, CPU)
    module = NativeLinear(tensor, CPU, "int8-fbgemm")
    reference = BACKEND.dequantize(tensor, torch.float32)
    x = torch.randn(6, 256, generator=g)
    x[2] *= 1e4  # one outlier token (as a BOS position often is)
    x[4] = 0  # and a row of zeros
    got, want = module(x), x @ reference.T
    alone = torch.cat([module(row) for row in x.split(1)])
    for row in (0, 1, 2, 3, 5):
        size = want[row].abs().max()
        assert (got[row] - want[row]).abs().max() <= 0.05 * size
        assert (alone[row] - want[row]).abs().max() <= 0.05 * size
    assert torch.equal(got[4], torch.zeros(64))


def test_q4_long_prefill_runs_dense_and_computes_what_the_kernel_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """From DENSE_ROWS rows on, the CPU q4 weight is unpacked from tinygemm's layout for one dense
    matmul: the dequantize-then-matmul reference within 1e-2, the kernel row by row within 1e-2."""
    import platform

    from llamactl.quantize import native
    from llamactl.quantize.native import DENSE_ROWS, int4_cpu_layout_known

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert int4_cpu_layout_known()  # where torch's pack is known, the fast path must not go missing
    elif not int4_cpu_layout_known():
        pytest.skip("this torch's CPU int4 pack has another layout: prefill stays on the kernel")
    w = awkward_weight(rows=136)  # 136 = 128 + 8: padded to 144 rows, not a multiple of 64 -> kernel only
    x = torch.randn(DENSE_ROWS + 3, 256, generator=torch.Generator().manual_seed(0))
    for rows in (136, 128):
        tensor = BACKEND.quantize(w[:rows], QuantSpec("q4"), None, CPU)
        module = NativeLinear(tensor, CPU, "int4-cpu")
        want = x @ BACKEND.dequantize(tensor, torch.float32).T
        got = module(x)
        by_rows = torch.cat([module(part) for part in x.split(DENSE_ROWS - 1)])  # below the threshold
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
        assert (got - by_rows).abs().max() <= 1e-2 * want.abs().max()
    monkeypatch.setattr(native, "DENSE_CHUNK", 64 * 256)  # 128 rows, unpacked one 64-row block at a time
    torch.testing.assert_close(module(x), got, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("scheme", ["q8", "q4"])
def test_vnni_prefill_runs_dense_and_computes_what_the_kernel_does(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """From VNNI_DENSE_ROWS rows on, a vnni weight is dequantized from its interleaved layout for
    dense matmuls (`DENSE_CHUNK` weights at a time): the dequantize-then-matmul reference within
    1e-2 (bf16 rounding), and the matvec row by row within the 8-bit tolerance."""
    from llamactl.quantize import native

    if not matvec.available(QuantSpec(scheme).bits, torch.bfloat16):
        pytest.skip("no AVX512-VNNI build here")
    tensor = BACKEND.quantize(awkward_weight(rows=40), QuantSpec(scheme), None, CPU)  # 40: padded groups
    module = NativeLinear(tensor, CPU, f"{scheme}-vnni")
    x = torch.randn(native.VNNI_DENSE_ROWS + 2, 256, generator=torch.Generator().manual_seed(3))
    want = x @ BACKEND.dequantize(tensor, torch.float32).T
    got = module(x)
    by_rows = torch.cat([module(part) for part in x.split(native.VNNI_DENSE_ROWS - 1)])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= EXACT_TOLERANCE * want.abs().max()
    assert (by_rows - want).abs().max() <= EIGHT_BIT_X_TOLERANCE * want.abs().max()
    monkeypatch.setattr(native, "DENSE_CHUNK", 16 * 256)  # one group of 16 rows at a time
    chunked = NativeLinear(tensor, CPU, f"{scheme}-vnni")
    torch.testing.assert_close(chunked(x), got, rtol=0, atol=0)


def test_a_vnni_head_writes_fp32_logits_itself() -> None:
    """out_dtype fp32 (a head): the kernel writes fp32, not bf16 widened afterwards."""
    if not matvec.available(8, torch.bfloat16):
        pytest.skip("no AVX512-VNNI build here")
    tensor = BACKEND.quantize(torch.randn(48, 256) * 0.05, QuantSpec("q8"), None, CPU)
    module = NativeLinear(tensor, CPU, "q8-vnni")
    x = torch.randn(1, 256).to(torch.bfloat16)
    wide = module(x).float()
    module.out_dtype = torch.float32
    got = module(x)
    assert got.dtype == torch.float32
    assert torch.equal(got.to(torch.bfloat16).float(), wide) and not torch.equal(got, wide)


@pytest.mark.parametrize(
    ("scheme", "kernel"),
    [("q8", "int8-fbgemm"), ("q8", "int8-split"), ("q4", "int4-cpu"), ("q8", "q8-vnni"), ("q4", "q4-vnni")],
)
def test_a_joined_kernel_computes_its_parts_side_by_side(scheme: str, kernel: str) -> None:
    """wq|wk|wv as one kernel: each part's columns equal that part's own kernel (rows 40, 24, 24:
    the int4 pack pads each to 16 separately but the join only once)."""
    if kernel.endswith("-vnni") and not matvec.available(QuantSpec(scheme).bits, torch.bfloat16):
        pytest.skip("no AVX512-VNNI build here")
    spec = QuantSpec(scheme)
    parts = [
        BACKEND.quantize(torch.randn(rows, 256) * 0.05, spec, heads, CPU)
        for rows, heads in ((40, 4), (24, 2), (24, None))
    ]
    joined = NativeLinear(parts, CPU, kernel)
    assert (joined.in_features, joined.out_features) == (256, 88)
    assert joined.stored_bytes == sum(p.parts["weight"].numel() for p in parts)
    x = torch.randn(3, 256)
    pieces = joined(x).split([40, 24, 24], dim=-1)
    for part, got in zip(parts, pieces):
        torch.testing.assert_close(got, NativeLinear(part, CPU, kernel)(x), rtol=0, atol=1e-6)
    assert BACKEND.joined_linear(parts, CPU) is not None
    other = BACKEND.quantize(torch.randn(8, 128), spec, None, CPU)  # another input size: not joined
    assert BACKEND.joined_linear([parts[0], other], CPU) is None


def test_loading_joins_quantized_projections_unless_a_part_is_kept(tmp_path: Path) -> None:
    """A q8 model runs wq|wk|wv and w1|w3 as one kernel each; a skip list that keeps w3 in float
    leaves w1 alone (not joined with a float part) and w3 an nn.Linear."""
    from llamactl.bench.models import build_random_model
    from tests._ckpt import tiny_args

    args = tiny_args(gqa=True)
    model = build_random_model(args, CPU, torch.float32)
    quantize_model(model, QuantSpec("q8"), CPU)
    for layer in model.layers:
        assert isinstance(layer.attention.wqkv, NativeLinear) and layer.attention.fused
        assert isinstance(layer.feed_forward.w13, NativeLinear) and layer.feed_forward.fused
    with pytest.raises(TypeError, match="cannot be split"):
        model.unfuse_projections()
    kept = build_random_model(args, CPU, torch.float32)
    quantize_model(kept, QuantSpec("q8"), CPU, skip=["*.w3.*"])
    ff = kept.layers[0].feed_forward
    assert not ff.fused and isinstance(ff.w1, NativeLinear) and type(ff.w3) is torch.nn.Linear


def test_fp32_compute_is_exactly_the_reference() -> None:
    """compute_dtype fp32 is asked for explicitly: dequantize-then-matmul, nothing else."""
    w = awkward_weight()
    tensor = BACKEND.quantize(w, QuantSpec("q4", compute_dtype="fp32"), None, CPU)
    module = BACKEND.linear(tensor, CPU)
    x = torch.randn(3, 256)
    assert module.kernel == "dequantized"
    torch.testing.assert_close(module(x), x @ BACKEND.dequantize(tensor, torch.float32).T)


def test_default_kernels_compute_in_bf16() -> None:
    for scheme in ("q8", "q4"):
        module = BACKEND.linear(BACKEND.quantize(awkward_weight(), QuantSpec(scheme), None, CPU), CPU)
        assert module.kernel == default_kernel(scheme, 256) and module.compute == torch.bfloat16
        assert module.nbytes < 96 * 256 * 2  # narrower than the bf16 weight


def test_rotary_rows_are_stored_in_hf_order() -> None:
    """wq / wk blocks are HF-ordered like every HF tensor; dequantize and the module give Meta's rows."""
    w = awkward_weight(rows=64)
    tensor = BACKEND.quantize(w, QuantSpec("q8"), 4, CPU)
    assert tensor.row_heads == 4
    assert torch.equal(tensor.parts["weight"], quantize_blocks(permute_for_hf(w, 4), QuantSpec("q8")))
    meta = QuantizedTensor(QuantSpec("q8"), (64, 256), {"weight": quantize_blocks(w, QuantSpec("q8"))})
    torch.testing.assert_close(BACKEND.dequantize(tensor, torch.float32), BACKEND.dequantize(meta, torch.float32))
    x = torch.randn(1, 256)
    assert torch.equal(NativeLinear(tensor, CPU, "int8-rows")(x), NativeLinear(meta, CPU, "int8-rows")(x))


def test_malformed_parts_are_refused() -> None:
    spec = QuantSpec("q4")
    with pytest.raises(Exception, match=r"blocks must be uint8 \[8, 36\]"):
        BACKEND.linear(QuantizedTensor(spec, (8, 64), {"weight": torch.zeros(8, 35, dtype=torch.uint8)}), CPU)


def test_bits_pick_the_native_schemes() -> None:
    assert parse_spec(8) == QuantSpec("q8") and parse_spec(4) == QuantSpec("q4")
    assert parse_spec(4, group_size=128) == QuantSpec("q4", group_size=128)
    assert parse_spec(4, quant_type="nf4").scheme == "nf4"  # bitsandbytes stays one option away
    assert backend(QuantSpec("q8")) is BACKEND
    with pytest.raises(UsageError, match="group size applies to the native schemes"):
        parse_spec(scheme=QuantSpec("nf4"), group_size=64)
    with pytest.raises(UsageError, match="double quant applies to bitsandbytes 4-bit schemes"):
        parse_spec(4, double_quant=False)
    with pytest.raises(UsageError, match="int8 threshold applies to int8 only"):
        parse_spec(8, threshold=4.0)
    assert "GGUF Q4_0 blocks" in QuantSpec("q4").describe()


def test_hf_config_round_trip() -> None:
    spec = QuantSpec("q4", group_size=64)
    config = spec.to_hf_config(["model.layers.0.mlp.down_proj"])
    assert config["quant_method"] == "llamactl" and config["group_size"] == 64
    assert QuantSpec.from_hf_config(config) == spec


def test_quantize_model_leaves_unfit_shapes() -> None:
    """A projection whose input is not whole blocks (stories260K's w2, in = 172) stays nn.Linear."""
    from llamactl.bench.models import build_random_model
    from tests._ckpt import tiny_args

    args = tiny_args(gqa=True)  # FFN 176: w1 / w3 (in = 64) fit, w2 (in = 176) does not
    model = build_random_model(args, CPU, torch.float32)
    hidden = model.layers[0].feed_forward.w2.in_features
    count = quantize_model(model, QuantSpec("q8"), CPU)
    per_layer = 7 if hidden % 32 == 0 else 6
    assert count == per_layer * args.n_layers


def _greedy(loaded, prompt: list[int], steps: int, forced: list[int] | None = None):  # type: ignore[no-untyped-def]
    """(the greedy pick of each step, its logits [steps, V]); `forced`: feed these tokens instead
    of the picks (teacher forcing: one near-tie then does not change every later step)."""
    model = loaded.model
    model.setup_cache(1, len(prompt) + steps + 1)
    with torch.inference_mode():
        logits = prefill(model, prompt, 0)
        out, rows = [], []
        for i in range(steps):
            rows.append(logits.float().view(-1))
            token = greedy(logits)
            out.append(token)
            logits = decode_one(loaded.step, forced[i] if forced else token, len(prompt) + i)
    return out, torch.stack(rows)


@pytest.mark.parametrize("scheme", ["q8", "q4"])
def test_stories_greedy_equals_dequantized_reference(stories_dir: Path, scheme: str) -> None:
    """The fast path (bf16 kernels, fp32 and bf16 models) decodes the tokens the fp32
    dequantize-then-matmul model decodes, on the real stories260K, where the arithmetic allows:
    fed the reference's tokens, every step picks the reference's token, except where the
    reference itself rates the other pick within the stated tolerance of its own (a near-tie;
    bf16 activations move stories260K's logits by up to 2% of their spread), at most 1 step in 10.
    Its logits stay within 3% (fp32 model) and 5% (bf16 model) of the reference's spread."""
    prompt, steps = [1], 40
    reference = load_model(stories_dir, device="cpu", dtype="fp32", quant=QuantSpec(scheme, compute_dtype="fp32"))
    want, want_logits = _greedy(reference, prompt, steps)
    spread = want_logits.abs().max()
    for dtype in ("fp32", None):  # None: the native default, bf16 throughout
        fast = load_model(stories_dir, device="cpu", dtype=dtype, quant=QuantSpec(scheme))
        assert fast.dtype == torch.float32 if dtype else fast.dtype == torch.bfloat16
        kernels = {m.kernel for m in fast.model.layers.modules() if isinstance(m, NativeLinear)}
        assert kernels == {default_kernel(scheme, 64)}  # every projection quantized has dim 64 inputs
        head = fast.model.output  # q8 whatever the blocks' scheme, as llama.cpp's quantizer does
        assert isinstance(head, NativeLinear) and (head.scheme, head.kernel) == ("q8", default_kernel("q8", 64))
        assert isinstance(reference.model.output, NativeLinear) and reference.model.output.kernel == "dequantized"
        got, logits = _greedy(fast, prompt, steps, forced=want)
        near = (0.01 if dtype else 0.02) * spread
        differ = [i for i in range(steps) if got[i] != want[i]]
        assert len(differ) <= steps // 10, (differ, got, want)
        for i in differ:
            assert want_logits[i, want[i]] - want_logits[i, got[i]] <= near, (i, want[i], got[i])
        assert (logits - want_logits).abs().max() <= (0.03 if dtype else 0.05) * spread


def test_head_runs_q8_tied_embeddings_stay_float_and_other_schemes_keep_it() -> None:
    """The head's q8 logits are the dequantize-then-matmul of gguf's own Q8_0 blocks of it."""
    from llamactl.model import Transformer
    from tests._ckpt import tiny_args

    torch.manual_seed(0)
    model = Transformer(tiny_args()).eval()
    model.output.weight = model.tok_embeddings.weight  # tied, as SmolLM2 and Llama 3.2
    table = model.tok_embeddings.weight.detach().clone()
    assert quantize_model(model, QuantSpec("q4")) == 12  # w2 (in 176, no multiple of 32) stays
    head = model.output
    assert isinstance(head, NativeLinear) and head.scheme == "q8"
    assert torch.equal(model.tok_embeddings.weight, table)  # the lookup still reads the float table
    x = torch.randn(3, table.shape[1])
    blocks = gguf.quants.quantize(table.numpy(), gguf.GGMLQuantizationType.Q8_0)
    reference = x @ torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)).t()
    assert torch.allclose(head(x).float(), reference, atol=0.02 * reference.abs().max().item())
    plain = Transformer(tiny_args()).eval()
    quantize_model(plain, QuantSpec("q8"), skip=["output"])
    assert type(plain.output) is torch.nn.Linear  # --skip output keeps it
    if storage(QuantSpec("int8")).supports(QuantSpec("int8"), (64, 64)):
        bnb = Transformer(tiny_args()).eval()
        quantize_model(bnb, QuantSpec("int8"))
        assert type(bnb.output) is torch.nn.Linear  # bitsandbytes: transformers' skip of lm_head
