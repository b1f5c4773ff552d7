"""The CUDA-graph decode step: same tokens and logits as the eager one; its state is its own."""

from __future__ import annotations

import pytest
import torch

from llamactl.engine.cuda_graph import CudaGraphStep, graphable
from llamactl.model import Transformer
from tests._ckpt import random_meta_state, tiny_args


def _model(args, state, dtype=torch.float32) -> Transformer:
    model = Transformer(args).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(dtype)


def test_what_cannot_be_graphed_says_why() -> None:
    args = tiny_args()
    model = _model(args, random_meta_state(args))
    assert graphable(model) == "needs a model on a CUDA device"
    if torch.cuda.is_available():
        assert "fused" in graphable(model.cuda())  # type: ignore[operator]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype: torch.dtype) -> None:
    args = tiny_args()
    model = _model(args, random_meta_state(args), dtype).cuda().fuse_projections()
    prompt = torch.randint(0, args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).cuda()
    assert graphable(model) is None
    graphed = CudaGraphStep(model)

    def greedy(graphs: bool) -> tuple[list[int], torch.Tensor]:
        model.setup_cache(1, 64)
        with torch.no_grad():
            token, logits, out = model(prompt, 0)[:, -1:].argmax(-1), [], []
            for pos in range(6, 30):
                step = graphed(token, pos) if graphs else model(token, pos)
                logits.append(step.clone())
                token = step[:, -1:].argmax(-1)
                out.append(int(token))
        return out, torch.cat(logits, 1)

    eager_tokens, eager_logits = greedy(False)
    graph_tokens, graph_logits = greedy(True)
    assert graphed.captured and not graphed.failed  # the graph path really ran
    assert not any("graph" in name for name in vars(model))  # its state is the step's, not the model's
    assert graph_tokens == eager_tokens
    assert (graph_logits - eager_logits).abs().max().item() <= (1e-4 if dtype == torch.float32 else 0.1)
