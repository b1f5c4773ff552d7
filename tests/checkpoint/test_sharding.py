from __future__ import annotations

import pytest
import torch

from llamactl.checkpoint.sharding import check_splittable, merge_shards, parse_size, plan_size_shards, split_tensor
from llamactl.errors import UsageError
from llamactl.layout import TensorInfo, split_dim
from tests._ckpt import meta_split, tiny_args


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("layers.0.attention.wq.weight", 0),
        ("layers.0.attention.wk.weight", 0),
        ("layers.0.attention.wv.weight", 0),
        ("layers.0.feed_forward.w1.weight", 0),
        ("layers.0.feed_forward.w3.weight", 0),
        ("output.weight", 0),
        ("layers.0.attention.wo.weight", 1),
        ("layers.0.feed_forward.w2.weight", 1),
        ("tok_embeddings.weight", 1),
        ("layers.0.attention_norm.weight", None),
        ("norm.weight", None),
    ],
)
def test_split_dims_are_metas(name: str, dim: int | None) -> None:
    assert split_dim(name) == dim
    full = torch.randn(8, 12) if dim is not None else torch.randn(12)
    pieces = split_tensor(name, full, 4)
    assert all(torch.equal(a, b) for a, b in zip(pieces, meta_split(name, full, 4)))
    assert torch.equal(merge_shards(name, pieces), full)


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1024", 1024), ("1.5 kb", 1500)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1GB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_plan_size_shards_packs_in_order_and_isolates_big_tensors() -> None:
    infos = [TensorInfo(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 100, 10, 10])]
    groups = plan_size_shards(infos, 80)
    assert [[i.name for i in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_check_splittable_names_the_problem() -> None:
    args = tiny_args(n_heads=8, n_kv_heads=2)
    with pytest.raises(UsageError, match="n_kv_heads 2 is not divisible by 4"):
        check_splittable(args, [], 4)
    check_splittable(args, [], 2)
