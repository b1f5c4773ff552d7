"""Tensor parallel on the CPU with gloo and 2 real processes, checked against one process and transformers.

Every `--tp 2` run below is a real leader process that starts its own rank 1 (or, for the
library tests, this test process is the leader). References are independent: a `--tp 1`
run of the same checkpoint and transformers' LlamaForCausalLM on the same weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamactl import estimate
from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.rank_view import RankView
from llamactl.errors import CheckpointError
from llamactl.generate import prefill
from llamactl.loading import load_model
from llamactl.quantize import QuantSpec
from tests._chat_util import train_tiny_tokenizer
from tests._ckpt import hf_reference_model, random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint
from tests.cli._run import assert_one_line_error, run_cli

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"gqa": 4, "mha": 8}  # 8 heads; KV heads


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For MHA and GQA (8 heads, 4 KV heads): a Meta MP=2 checkpoint and an HF one, same weights."""
    root = tmp_path_factory.mktemp("tp")
    tok = train_tiny_tokenizer(root / "tok")
    out: dict[str, Path] = {}
    for name, kv in SHAPES.items():
        args = tiny_args(n_heads=8, n_kv_heads=kv, max_seq_len=512)
        state = random_meta_state(args, seed=7)
        out[f"{name}-meta"] = write_meta_checkpoint(root / f"{name}-meta", args, state, mp=2, tokenizer=tok)
        hf = write_hf_checkpoint(root / f"{name}-hf", args, state)
        (hf / "tokenizer.model").write_bytes(tok.read_bytes())
        out[f"{name}-hf"] = hf
        torch.save(state, root / f"{name}.state")
        out[f"{name}-state"] = root / f"{name}.state"
    return out


def llamactl(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    full = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "llamactl", *args], env=full, text=True, **kw
    )


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    child = llamactl(*args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(stdin, timeout=150)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_children(child: subprocess.Popen[str], within: float = 60) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and child.poll() is None:
        kids = children(child.pid)
        if kids:
            return kids
        time.sleep(0.02)
    raise AssertionError("the leader started no rank")


# ------------------------------------------------------------------ greedy tokens: --tp 2 == --tp 1

GREEDY = ("-t", "0", "-n", "24", "--device", "cpu")


@pytest.mark.parametrize(
    "which",
    [
        "gqa-meta",
        pytest.param("gqa-hf", marks=pytest.mark.slow),
        pytest.param("mha-meta", marks=pytest.mark.slow),
        pytest.param("mha-hf", marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_equals_one_process(models: dict[str, Path], which: str) -> None:
    """Meta MP=2 (each rank reads its own shard) and HF (split on the fly), MHA and GQA."""
    one = run_cli("generate", str(models[which]), "Once upon a time", *GREEDY)
    assert one.exit_code == 0, one.stderr
    two = run("generate", str(models[which]), "Once upon a time", *GREEDY, "--tp", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # only rank 0 prints, exactly what one process prints
    assert two.stderr == ""


@pytest.mark.slow
def test_stories260k_over_two_ranks_reproduces_llama2c_golden_output(stories_dir: Path) -> None:
    """An outside oracle: llama2.c's own greedy output for stories260K (8 heads, 4 KV heads)."""
    readme = (stories_dir.parent / "README.md").read_text()
    golden = re.search(r"prints exactly:\n\n```\n(.*?)\n```", readme, re.S).group(1)  # type: ignore[union-attr]
    done = run("generate", str(stories_dir), "", "-t", "0", "-n", "200", "--device", "cpu", "--tp", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == golden + "\n"


@pytest.mark.slow
def test_second_chat_turn_reuses_the_cache_and_equals(models: dict[str, Path]) -> None:
    turns = "Tell me a story\nAnd then what happened\n"
    flags = ("--each-line", "-t", "0", "-n", "16", "--device", "cpu", "--json")
    one = run_cli("chat", str(models["gqa-hf"]), *flags, input=turns)
    two = run("chat", str(models["gqa-hf"]), *flags, "--tp", "2", stdin=turns)
    assert one.exit_code == 0 and two.returncode == 0, two.stderr
    want = [json.loads(line) for line in one.stdout.splitlines()]
    got = [json.loads(line) for line in two.stdout.splitlines()]
    assert [r["content"] for r in got] == [r["content"] for r in want]
    second = got[1]
    assert second["tokens_prefilled"] < second["tokens_in"]  # the first exchange came from the cache
    assert second["tokens_prefilled"] == want[1]["tokens_prefilled"]


# ------------------------------------------------------------------ logits and memory (this process leads)


@pytest.mark.parametrize(
    ("which", "shape"), [("gqa-hf", "gqa"), pytest.param("mha-meta", "mha", marks=pytest.mark.slow)]
)
def test_logits_match_transformers_and_each_rank_holds_its_share(
    models: dict[str, Path], which: str, shape: str
) -> None:
    state = torch.load(models[f"{shape}-state"], weights_only=True)
    reader = open_checkpoint(models[which])
    ids = [1, 17, 42, 99, 5, 230, 64, 8]
    hf = hf_reference_model(reader.args, state)
    with torch.no_grad():
        want = hf(torch.tensor([[*ids, 77]])).logits[0].float()  # [T,V]
    with load_model(reader, device="cpu", dtype="fp32", tp=2) as loaded:
        assert loaded.tp == 2
        kv = loaded.model.setup_cache(1, 64)
        last = prefill(loaded.model, ids, 0)
        step = loaded.step(torch.tensor([[77]]), len(ids))[0, -1]  # a decode step at the next position
        held = loaded.rank_weight_bytes
    torch.testing.assert_close(last, want[len(ids) - 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, want[len(ids)], atol=1e-5, rtol=0)
    infos = reader.tensor_infos()
    total = sum(i.numel * 4 for i in infos)
    largest = max(i.numel * 4 for i in infos)
    assert len(held) == 2 and all(h <= total / 2 + largest for h in held), (held, total, largest)
    assert kv == estimate.kv_cache_bytes(reader.args, 64, dtype="fp32") // 2  # the KV cache is 1/N too


@pytest.mark.slow
def test_quantized_on_load_shards_compose(models: dict[str, Path]) -> None:
    """q8 (per-row groups of 32 along the input) quantizes each rank's slice to the full tensor's blocks."""
    spec = QuantSpec("q8", compute_dtype="fp32")
    ids = [1, 17, 42, 99, 5]
    with load_model(models["gqa-meta"], device="cpu", dtype="fp32", quant=spec) as one:
        one.model.setup_cache(1, 32)
        want = prefill(one.model, ids, 0)
    with load_model(models["gqa-meta"], device="cpu", dtype="fp32", quant=spec, tp=2) as two:
        two.model.setup_cache(1, 32)
        got = prefill(two.model, ids, 0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got.argmax() == want.argmax()


def test_a_meta_shard_per_rank_reads_only_its_own_file(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["gqa-meta"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in src.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    shard0 = torch.load(copy / "consolidated.00.pth", weights_only=True)
    reader = open_checkpoint(copy)
    (copy / "consolidated.01.pth").unlink()  # rank 0 never needs it
    got = dict(RankView(reader, 0, 2).iter_tensors())
    assert got.keys() == shard0.keys()
    assert all(torch.equal(got[name], shard0[name]) for name in shard0)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        dict(RankView(reader, 1, 2).iter_tensors())


# ------------------------------------------------------------------ bad input and failures


def test_tp_must_divide_the_heads(models: dict[str, Path]) -> None:
    out = run_cli("generate", str(models["gqa-meta"]), "hi", "--tp", "3", "--device", "cpu")
    assert_one_line_error(out, "--tp 3", "n_heads 8 is not divisible by 3", code=2)


def test_a_rank_raising_mid_decode_ends_the_run(models: dict[str, Path]) -> None:
    env = {"LLAMACTL_TP_FAULT": "1:20"}  # rank 1 raises at the decode step of position 20
    child = llamactl(
        "generate", str(models["gqa-meta"]), "Once", *GREEDY, "--tp", "2",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    ranks = wait_for_children(child)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1
    assert err.strip().splitlines() == [
        "llamactl: error: tensor-parallel rank 1 failed: RuntimeError: injected fault at position 20 (LLAMACTL_TP_FAULT)"
    ]
    assert not any(alive(pid) for pid in ranks)


@pytest.mark.slow
def test_ctrl_c_mid_decode_exits_130_everywhere(models: dict[str, Path]) -> None:
    child = llamactl(
        "generate", str(models["mha-hf"]), "Once", "-t", "0", "-n", "400", "--device", "cpu", "--tp", "2",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    ranks = wait_for_children(child)
    assert child.stdout is not None
    child.stdout.read(1)  # decoding has started
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert err.strip().splitlines() == ["llamactl: interrupted"]
    assert not any(alive(pid) for pid in ranks)


@pytest.mark.slow
def test_repl_with_tp_in_a_pty(models: dict[str, Path], tmp_path: Path) -> None:
    """Rank 0 reads the terminal; Ctrl-C cuts a turn on every rank; the next turn still works; exit ends all."""
    import pexpect

    env = dict(
        os.environ, PYTHONPATH=str(ROOT), LLAMACTL_HOME=str(tmp_path / "home"), TERM="xterm", OMP_NUM_THREADS="1"
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamactl", "chat", str(models["gqa-meta"]), "-t", "0", "-n", "8", "--device", "cpu", "--tp", "2"],
        env=env,
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 200),
    )
    child.expect_exact(">>> ")
    ranks = children(child.pid)
    assert len(ranks) == 1
    child.sendline("Once upon a time")
    child.expect(r"8 tokens .*context \d+/4096")
    child.expect_exact(">>> ")
    child.sendline("/set max_new_tokens none")
    child.expect_exact(">>> ")
    child.sendline("The cat")
    child.expect_exact("The cat\r\n")
    child.expect_exact("\x1b[2K")  # the first token arrived
    child.sendintr()
    child.expect_exact("[answer cut]")
    child.expect_exact(">>> ")
    child.sendline("/set max_new_tokens 4")
    child.expect_exact(">>> ")
    child.sendline("and the dog")  # every rank is still in step after the cut
    child.expect(r"4 tokens .*context \d+/4096")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallel needs 2 CUDA GPUs")
def test_nccl_greedy_equals_one_gpu(models: dict[str, Path]) -> None:
    flags = ("Once upon a time", "-t", "0", "-n", "24", "--device", "cuda", "--dtype", "fp32")
    one = run("generate", str(models["gqa-meta"]), *flags)
    two = run("generate", str(models["gqa-meta"]), *flags, "--tp", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


@pytest.mark.slow
def test_bench_tp_reports_memory_per_rank_against_the_formulas(models: dict[str, Path]) -> None:
    flags = ("--device", "cpu", "--ctx", "128", "--prompt-tokens", "16", "--gen-tokens", "8", "--repeat", "1", "--json")
    done = run("bench", str(models["gqa-meta"]), "--tp", "2", *flags)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tp"] == 2 and report["backend"] == "gloo"
    assert report["weight_bytes"] == [report["weight_bytes_formula"]] * 2
    assert report["kv_bytes"] == [report["kv_bytes_formula"]] * 2 == [report["kv_bytes_tp1_formula"] // 2] * 2
    norms = (2 * 2 + 1) * 64 * 4  # replicated fp32 norms; everything else is halved
    assert report["weight_bytes_formula"] == (report["weight_bytes_tp1_formula"] - norms) // 2 + norms
    assert report["tg_ts"] > 0 and 0 < report["comm_share_decode"] < 1
    assert report["comm_calls_per_token"] == 2 + 2 * 2  # embedding + head gathers, 2 all-reduces per layer


@pytest.mark.slow
def test_under_torchrun_only_rank_0_prints_what_one_process_prints(models: dict[str, Path]) -> None:
    one = run_cli("generate", str(models["gqa-hf"]), "Once upon a time", *GREEDY)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "llamactl", "generate",
         str(models["gqa-hf"]), "Once upon a time", *GREEDY, "--tp", "2"],
        env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == one.stdout


def test_a_checkpoint_stored_quantized_is_refused_before_any_rank_starts(
    models: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / "q8"
    made = run_cli("quantize", str(models["gqa-hf"]), str(dst), "--bits", "8", "--no-eval")
    assert made.exit_code == 0, made.stderr
    out = run_cli("generate", str(dst), "hi", "--tp", "2", "--device", "cpu")
    assert_one_line_error(out, str(dst), "stored quantized (q8)", "quantize on load")


def test_split_on_the_fly_keeps_only_the_share_of_each_tensor(models: dict[str, Path]) -> None:
    """From an HF checkpoint each rank's tensor owns just its slice: the full tensor is dropped at once."""
    reader = open_checkpoint(models["gqa-hf"])
    full = {i.name: i for i in reader.tensor_infos()}
    for rank in (0, 1):
        view = RankView(reader, rank, 2)
        assert not view.own_shard
        for name, tensor in view.iter_tensors():
            assert tensor.untyped_storage().nbytes() == tensor.nbytes  # not a view into the whole tensor
            replicated = name.endswith("norm.weight")
            assert tensor.numel() * (1 if replicated else 2) == full[name].numel, name


@pytest.mark.slow
def test_a_rank_killed_mid_decode_ends_the_run(models: dict[str, Path]) -> None:
    child = llamactl(
        "generate", str(models["gqa-meta"]), "Once", "-t", "0", "-n", "400", "--device", "cpu", "--tp", "2",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    (rank,) = wait_for_children(child)
    assert child.stdout is not None
    child.stdout.read(1)  # decoding has started
    os.kill(rank, signal.SIGKILL)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 1
    assert err.strip().splitlines() == ["llamactl: error: tensor-parallel rank 1 was killed by SIGKILL"]


@pytest.mark.slow
def test_every_rank_exits_with_the_leaders_code(models: dict[str, Path]) -> None:
    """Ctrl-C inside the run: rank 0 raises KeyboardInterrupt and rank 1 exits 130 too; a clean end exits 0."""
    with pytest.raises(KeyboardInterrupt), load_model(models["gqa-meta"], device="cpu", tp=2) as loaded:
        launch = loaded.group.launch  # type: ignore[union-attr]
        loaded.model.setup_cache(1, 16)
        raise KeyboardInterrupt
    assert [w.returncode for w in launch.workers] == [130]  # type: ignore[union-attr]
    with load_model(models["gqa-meta"], device="cpu", tp=2) as loaded:
        launch = loaded.group.launch  # type: ignore[union-attr]
    assert [w.returncode for w in launch.workers] == [0]  # type: ignore[union-attr]


def test_bench_tp_1_is_the_same_method_in_one_process(models: dict[str, Path]) -> None:
    flags = ("--device", "cpu", "--ctx", "64", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--json")
    out = run_cli("bench", str(models["gqa-meta"]), "--tp", "1", *flags)
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "none" and report["comm_share_decode"] == 0
    assert report["weight_bytes"] == [report["weight_bytes_tp1_formula"]] == [report["weight_bytes_formula"]]
    assert report["kv_bytes"] == [report["kv_bytes_tp1_formula"]]
    assert_one_line_error(run_cli("bench", "--tp", "2"), "--tp needs a MODEL", code=2)
