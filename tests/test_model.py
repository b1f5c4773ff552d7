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
        attention = model.layers[0].attention
        assert attention.wqkv is not None and attention.wq.weight.data_ptr() == attention.wqkv.data_ptr()
        assert (model(tokens) - plain).abs().max().item() <= 1e-5
        saved = model.state_dict()
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
        model.to(torch.float64)  # any move or cast undoes the fusion rather than splitting it silently
        assert attention.wqkv is None and model.layers[0].feed_forward.w13 is None
        assert (model(tokens) - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_static_decode_step_equals_the_full_forward(kv_heads: int) -> None:
    """The CUDA-graph form of a step (position as a tensor, whole cache masked) changes nothing."""
    args = tiny_args(n_kv_heads=kv_heads)
    model = _model(args, random_meta_state(args)).fuse_projections()
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(batch=2, max_seq_len=64)
        parts = [model(tokens[:, :8], 0)] + [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(8, 20)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl.graphs import decode_step

    monkeypatch.setenv("LLAMACTL_CUDA_GRAPHS", "1")
    args = tiny_args()
    model = _model(args, random_meta_state(args), dtype).cuda().fuse_projections()
    prompt = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).cuda()

    def greedy(graphs: bool) -> tuple[list[int], torch.Tensor]:
        model.setup_cache(1, 64)
        with torch.no_grad():
            token, logits, out = model(prompt, 0)[:, -1:].argmax(-1), [], []
            for pos in range(6, 30):
                step = decode_step(model, token, pos) if graphs else model(token, pos)
                logits.append(step.clone())
                token = step[:, -1:].argmax(-1)
                out.append(int(token))
        return out, torch.cat(logits, 1)

    eager_tokens, eager_logits = greedy(False)
    graph_tokens, graph_logits = greedy(True)
    assert getattr(model, "_graphed_step", None) is not None  # the graph path really ran
    assert graph_tokens == eager_tokens
    assert (graph_logits - eager_logits).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.1)
