from __future__ import annotations

import pytest
import torch

from llamactl.model import Transformer
from tests._ckpt import hf_reference_model, random_meta_state, tiny_args


def _model(args, state, dtype=torch.float32) -> Transformer:
    model = Transformer(args).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(dtype)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_transformers(kv_heads: int) -> None:
    args = tiny_args(n_kv_heads=kv_heads)
    state = random_meta_state(args, seed=kv_heads)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _model(args, state)(tokens)
        theirs = hf_reference_model(args, state)(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_last_only_logits_equal_transformers_logits_to_keep() -> None:
    args = tiny_args()
    state = random_meta_state(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = _model(args, state)(tokens, last_only=True)
        theirs = hf_reference_model(args, state)(tokens, logits_to_keep=1).logits
    assert ours.shape == theirs.shape == (2, 1, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kv_cached_incremental_forward_equals_full(kv_heads: int) -> None:
    args = tiny_args(n_kv_heads=kv_heads)
    model = _model(args, random_meta_state(args))
    tokens = torch.randint(0, args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(batch=1, max_seq_len=64)
        # a prompt, a later multi-token turn (masked against the cache), then single-token decode
        parts = [model(tokens[:, :7], 0), model(tokens[:, 7:12], 7)]
        parts += [model(tokens[:, i : i + 1], i) for i in range(12, 20)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_fp32(dtype: torch.dtype) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _model(args, state)(tokens)
        low = _model(args, state, dtype)(tokens)
    assert low.dtype == torch.float32  # logits always come back in fp32
    assert torch.equal(low.argmax(-1), ref.argmax(-1)) or (low - ref).abs().max() < 0.1
    assert _model(args, state, dtype).freqs_cis.dtype == torch.complex64  # rotary table never rounded


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_query_cpu_attention_equals_sdpa_in_fp32(kv_heads: int, dtype: torch.dtype) -> None:
    """A 16-bit decode step's attention (widened to fp32 SDPA) against torch's SDPA in fp32,
    the G query heads of a kv head expanded as Meta's repeat_kv does; masked slots ignored."""
    from llamactl.model import attend

    gen = torch.Generator().manual_seed(kv_heads)
    b, h, s, d = 2, 4, 37, 16
    q = torch.randn(b, 1, h, d, generator=gen) * 2
    k, v = torch.randn(b, kv_heads, s, d, generator=gen) * 2, torch.randn(b, kv_heads, s, d, generator=gen)
    mask = torch.zeros(1, s)
    mask[0, 30:] = float("-inf")  # cache slots not written yet
    q16, k16, v16 = q.to(dtype), k.to(dtype), v.to(dtype)
    rep = h // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q16.float().transpose(1, 2),
        k16.float().repeat_interleave(rep, dim=1),
        v16.float().repeat_interleave(rep, dim=1),
        attn_mask=mask,
    ).transpose(1, 2)
    for m in (mask, None):
        got = attend(q16, k16[:, :, :30] if m is None else k16, v16[:, :, :30] if m is None else v16, m, 1)
        assert got.dtype == dtype and got.shape == (b, 1, h * d)
        assert (got.float() - want.reshape(b, 1, h * d)).abs().max() <= 0.02


def test_setup_cache_size_follows_formula() -> None:
    args = tiny_args()
    model = _model(args, random_meta_state(args))
    nbytes = model.setup_cache(batch=3, max_seq_len=100, dtype=torch.float16)
    assert nbytes == 2 * args.n_layers * args.kv_heads * args.head_dim * 100 * 3 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    args = tiny_args()
    state = random_meta_state(args)
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = _model(args, state)(tokens)
        gpu_model = _model(args, state, dtype).cuda()
        gpu = gpu_model(tokens.cuda()).cpu()
        gpu_model.setup_cache(1, 32)
        inc = torch.cat(
            [gpu_model(tokens[:, :5].cuda(), 0)] + [gpu_model(tokens[:, i : i + 1].cuda(), i) for i in range(5, 12)], 1
        )
    tol = 1e-3 if dtype == torch.float32 else 0.15
    assert (gpu - cpu).abs().max().item() <= tol
    assert (inc.cpu() - gpu).abs().max().item() <= tol


def test_fused_projections_change_nothing_but_the_matmul_count() -> None:
    args = tiny_args()
    state = random_meta_state(args)
    model = _model(args, state)
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(tokens)
        model.fuse_projections()
        attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
        assert attention.fused and ffn.fused and not hasattr(attention, "wq") and not hasattr(ffn, "w1")
        assert (model(tokens) - plain).abs().max().item() <= 1e-5
        saved = model.state_dict()
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
        assert list(saved) == list(Transformer(args).state_dict())  # Meta's names in Meta's order
        model.to(torch.float64)  # the fused weight is a real tensor: moving or casting just works
        assert attention.fused and attention.wqkv.weight.dtype == torch.float64
        assert (model(tokens) - plain).abs().max().item() <= 1e-5
        model.to(torch.float32).unfuse_projections()
        assert not attention.fused and type(attention.wq) is torch.nn.Linear
        assert list(model.state_dict()) == list(saved) and (model(tokens) - plain).abs().max().item() <= 1e-5


def test_a_fused_model_loads_metas_names() -> None:
    """gpt-fast's load hook: Meta's wq/wk/wv (w1/w3) load into a fused model as one weight."""
    args = tiny_args()
    state = random_meta_state(args)
    tokens = torch.randint(0, args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(7))
    fused = _model(args, random_meta_state(args, seed=9)).fuse_projections()
    fused.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fused(tokens), _model(args, state).fuse_projections()(tokens))
    assert all(torch.equal(fused.state_dict()[k], state[k]) for k in state)


def test_only_plain_linear_projections_are_fused() -> None:
    """A projection a quantizer replaced stays separate, and so do the others of its group."""

    class Replaced(torch.nn.Linear):
        pass

    args = tiny_args()
    model = _model(args, random_meta_state(args))
    old = model.layers[0].attention.wk
    replacement = Replaced(old.in_features, old.out_features, bias=False)
    replacement.weight = old.weight
    model.set_submodule("layers.0.attention.wk", replacement)
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = model(tokens)
        model.fuse_projections()
        first, second = model.layers[0], model.layers[1]
        assert not first.attention.fused and first.attention.wk is replacement and first.feed_forward.fused
        assert second.attention.fused and second.feed_forward.fused
        assert (model(tokens) - plain).abs().max().item() <= 1e-5
        assert "layers.0.attention.wk.weight" in model.state_dict()


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_static_decode_step_equals_the_full_forward(kv_heads: int) -> None:
    """The CUDA-graph form of a step (position as a tensor, whole cache masked) changes nothing."""
    args = tiny_args(n_kv_heads=kv_heads)
    model = _model(args, random_meta_state(args)).fuse_projections()
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(batch=2, max_seq_len=64)
        parts = [model(tokens[:, :8], 0)]
        parts += [model(tokens[:, i : i + 1], torch.tensor([i]), kv_len=model.cache_len) for i in range(8, 20)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_reading_more_of_the_cache_changes_nothing() -> None:
    """kv_len only sets how much of the cache is read: unwritten slots are masked."""
    args = tiny_args()
    model = _model(args, random_meta_state(args))
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.setup_cache(1, 32)
        model(tokens[:, :5], 0)
        filled = model(tokens[:, 5:], 5)
        model.setup_cache(1, 32)
        model(tokens[:, :5], 0, kv_len=32)
        whole = model(tokens[:, 5:], torch.tensor([5]), kv_len=32)
    assert (filled - whole).abs().max().item() <= 1e-5


def test_positions_past_the_cache_or_rotary_table_are_refused() -> None:
    args = tiny_args(max_seq_len=16)
    model = _model(args, random_meta_state(args))
    with pytest.raises(ValueError, match="rotary table"):
        model(torch.zeros(1, 4, dtype=torch.long), 14)
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 2, dtype=torch.long), 7)


def test_the_rotary_table_follows_the_model_without_apply_hooks() -> None:
    args = tiny_args()
    with torch.device("meta"):
        model = Transformer(args)
    assert model.freqs_cis.device.type == "cpu"  # built for real even on the meta device
    assert torch.equal(model.freqs_cis, Transformer(args).freqs_cis)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_query_heads_as_rows_equal_sdpa_grouping(kv_heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GQA layout CUDA uses (heads as extra query rows), checked here on the CPU."""
    import llamactl.model

    args = tiny_args(n_kv_heads=kv_heads)
    model = _model(args, random_meta_state(args))
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        native = model(tokens)
        monkeypatch.setattr(llamactl.model, "query_rows", lambda _device, group: group)
        rows = model(tokens)
        model.setup_cache(2, 32)
        parts = [model(tokens[:, :5], 0)] + [model(tokens[:, i : i + 1], i) for i in range(5, 12)]
        static = model(tokens[:, 11:], torch.tensor([11]), kv_len=32)
    assert (rows - native).abs().max().item() <= 1e-5
    assert (torch.cat(parts, 1) - native).abs().max().item() <= 1e-5
    assert (static[:, -1] - native[:, -1]).abs().max().item() <= 1e-5
