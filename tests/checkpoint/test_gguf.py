"""GGUF: dequantizers against gguf.quants, the reader against llama.cpp's conventions, the
writer against gguf.GGUFReader, transformers and llama.cpp itself."""

from __future__ import annotations

import json
import subprocess
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llamactl.checkpoint import open_checkpoint
from llamactl.checkpoint.gguf import GGUFReader
from llamactl.checkpoint.gguf_quants import GGML_TYPES, UNSUPPORTED_NAMES, dequantize
from llamactl.checkpoint.quantized import DequantizedView
from llamactl.convert import convert, plan_convert, run_convert
from llamactl.errors import UsageError
from llamactl.loading import load_model
from llamactl.templates.llama2 import HF_TEMPLATE as LLAMA2_CHAT_TEMPLATE
from tests._ckpt import (
    hf_reference_model,
    load_pth_dir,
    random_meta_state,
    tiny_args,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from tests._gguf import demo_gguf, llama_env, llama_tool, write_reference_gguf

QUANTIZED = [t for t in GGML_TYPES if t.quantized]
TEXTS = ["Once upon a time", "  two  spaces\nand a newline", "Emoji 🦙, ünïcode, digits 12345", "[INST] hi [/INST]"]


def _tokens(vocab: int, n: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(5))


def _ours(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """llamactl's logits with every tensor dequantized to fp32, as transformers' GGUF loader does
    (Q8_0 / Q4_0 would otherwise run at native width through the q8 / q4 kernels)."""
    with torch.no_grad():
        reader = DequantizedView(open_checkpoint(path))
        return load_model(reader, device="cpu", dtype=torch.float32).model(tokens)


def _transformers_gguf(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _gguf_oracle(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (ggml type, float32 values) read by gguf-py's reader and dequantizer."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        t.name: (t.tensor_type.name, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)) for t in reader.tensors
    }


# ----------------------------------------------------------------------------- dequantizers


def test_type_table_matches_gguf_constants() -> None:
    import gguf

    for t in GGML_TYPES:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.id)] == (t.block, t.size)
        assert gguf.GGMLQuantizationType(t.id).name == t.name
    for type_id, name in UNSUPPORTED_NAMES.items():
        assert gguf.GGMLQuantizationType(type_id).name == name


# Byte offsets of each block's fp16 scale fields: random bytes there could be inf / NaN.
_F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


@pytest.mark.parametrize("ggml", QUANTIZED, ids=[t.name for t in QUANTIZED])
def test_dequantize_equals_gguf_quants_on_every_bit_pattern(ggml) -> None:  # type: ignore[no-untyped-def]
    """Random block bytes exercise every quant bit and scale packing; gguf.quants is the oracle."""
    import gguf

    rng = np.random.default_rng(ggml.id)
    rows, cols = 37, ggml.block * 3
    raw = rng.integers(0, 256, size=(rows, cols // ggml.block, ggml.size), dtype=np.uint8)
    for at in _F16_FIELDS[ggml.name]:
        scales = (rng.standard_normal(raw.shape[:2]) * 0.02).astype(np.float16)
        raw[..., at : at + 2] = scales[..., None].view(np.uint8)
    raw = raw.reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml.id))
    ours = dequantize(torch.from_numpy(raw.copy()).reshape(-1), ggml, (rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.equal(ours, torch.from_numpy(expected))


@pytest.fixture(scope="module")
def k_quant_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dim-256 model (K-quant blocks fit) quantized by llama.cpp's own llama-quantize."""
    quantize = llama_tool("llama-quantize")
    root = tmp_path_factory.mktemp("kquant")
    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256, vocab_size=512)
    f32 = write_reference_gguf(root / "f32.gguf", args, random_meta_state(args, seed=11))
    out = {}
    for ftype in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_1", "Q5_1", "Q8_0"):
        target = root / f"{ftype}.gguf"
        subprocess.run(
            [str(quantize), str(f32), str(target), ftype, "1"], env=llama_env(), check=True, capture_output=True
        )
        out[ftype] = target
    return out


def test_dequantize_real_llama_quantize_blocks(k_quant_files: dict[str, Path]) -> None:
    seen = set()
    for path in k_quant_files.values():
        reader = open_checkpoint(path)
        oracle = _gguf_oracle(path)
        by_gguf = {t.name: t for t in reader.file.tensors}
        for meta_name, tensor in DequantizedView(reader).iter_tensors():
            if meta_name == "output.weight" and reader.tied:
                continue
            gguf_name = reader.tensors[meta_name].name
            kind, expected = oracle[gguf_name]
            seen.add(kind)
            assert by_gguf[gguf_name].ggml.name == kind
            assert torch.equal(tensor.float(), torch.from_numpy(expected.astype(np.float32))), (path.name, gguf_name)
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_1", "Q8_0"} <= seen, seen


def test_k_quant_file_logits_equal_transformers(k_quant_files: dict[str, Path]) -> None:
    path = k_quant_files["Q4_K_M"]
    tokens = _tokens(512)
    assert (_ours(path, tokens) - _transformers_gguf(path, tokens)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0"])
def test_reference_gguf_reads_in_meta_layout(tmp_path: Path, dtype: str) -> None:
    """llama.cpp's q/k permutation undone, names mapped, metadata mapped to ModelArgs."""
    args = tiny_args(rope_theta=50000.0, norm_eps=1e-6, max_seq_len=1024)
    state = random_meta_state(args, seed=2)
    path = write_reference_gguf(tmp_path / "ref.gguf", args, state, dtype=dtype)
    reader = open_checkpoint(path)
    assert reader.format == "gguf" and reader.args == args
    assert (reader.quant.scheme if reader.quant else None) == ("q8" if dtype == "Q8_0" else None)
    got = dict(DequantizedView(reader).iter_tensors())
    assert set(got) == set(state)
    for name, tensor in got.items():
        if dtype == "F32" or tensor.ndim == 1:
            assert torch.equal(tensor, state[name]), name
        else:
            assert (tensor.float() - state[name]).abs().max() < 0.05, name
    tokens = _tokens(args.vocab_size)
    assert (_ours(path, tokens) - _transformers_gguf(path, tokens)).abs().max().item() <= 1e-4


def test_tied_embeddings_feed_the_head(tmp_path: Path) -> None:
    args = tiny_args()
    state = random_meta_state(args, seed=4)
    state["output.weight"] = state["tok_embeddings.weight"]
    path = write_reference_gguf(tmp_path / "tied.gguf", args, state, tie=True)
    reader = open_checkpoint(path)
    assert isinstance(reader, GGUFReader) and reader.tied and reader.storage()["tied_embeddings"]
    assert "output.weight" in {i.name for i in reader.tensor_infos()}
    got = dict(reader.iter_tensors())
    assert torch.equal(got["output.weight"], state["tok_embeddings.weight"])
    tokens = _tokens(args.vocab_size)
    assert (_ours(path, tokens) - _transformers_gguf(path, tokens)).abs().max().item() <= 1e-4


def test_directory_with_one_gguf_resolves(tmp_path: Path) -> None:
    args = tiny_args()
    folder = tmp_path / "model"
    folder.mkdir()
    write_reference_gguf(folder / "m.gguf", args, random_meta_state(args))
    reader = open_checkpoint(folder)
    assert reader.format == "gguf" and reader.files == [folder / "m.gguf"]


def test_reading_is_lazy_and_tensor_by_tensor(tmp_path: Path) -> None:
    """open() touches no tensor data; each tensor is read into its own memory (no file mapping,
    so a file truncated while it is read is an error, not a SIGBUS)."""
    args = tiny_args()
    path = write_reference_gguf(tmp_path / "ref.gguf", args, random_meta_state(args))
    reader = open_checkpoint(path)
    name, first = next(iter(reader.iter_tensors()))
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()  # its own bytes only
    assert name == "tok_embeddings.weight"


def test_real_llama2_tokenizer_rebuilt_from_gguf_encodes_identically(tmp_path: Path, llama2_tokenizer: Path) -> None:
    import sentencepiece as spm

    args = tiny_args(vocab_size=32000)
    path = write_reference_gguf(tmp_path / "ref.gguf", args, random_meta_state(args), tokenizer=llama2_tokenizer)
    rebuilt = open_checkpoint(path).tokenizer_path
    assert rebuilt is not None
    original, ours = (
        spm.SentencePieceProcessor(model_file=str(llama2_tokenizer)),
        spm.SentencePieceProcessor(model_file=str(rebuilt)),
    )
    assert (ours.bos_id(), ours.eos_id(), ours.unk_id(), ours.vocab_size()) == (1, 2, 0, 32000)
    for text in TEXTS:
        assert ours.encode(text) == original.encode(text), text
    assert ours.encode("[INST]") == [518, 25580, 29962]


def test_rebuilt_model_fields_are_sentencepieces_own(tmp_path: Path, tiny_tokenizer: Path) -> None:
    """The hand-encoded protobuf parsed by sentencepiece's generated module."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    args = tiny_args()
    path = write_reference_gguf(tmp_path / "ref.gguf", args, random_meta_state(args), tokenizer=tiny_tokenizer)
    rebuilt = open_checkpoint(path).tokenizer_path
    assert rebuilt is not None
    model = pb2.ModelProto()
    model.ParseFromString(rebuilt.read_bytes())
    assert model.trainer_spec.model_type == pb2.TrainerSpec.BPE and model.trainer_spec.byte_fallback
    assert (model.trainer_spec.bos_id, model.trainer_spec.eos_id, model.trainer_spec.pad_id) == (1, 2, -1)
    assert model.normalizer_spec.add_dummy_prefix and not model.normalizer_spec.remove_extra_whitespaces
    assert len(model.pieces) == 320 and model.pieces[3].type == pb2.ModelProto.SentencePiece.BYTE


def test_smollm2_demo_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real Q4_1 file with a gpt2 vocabulary and tied embeddings: metadata, types, dequantization."""
    path = demo_gguf(tmp_path_factory.mktemp("smollm2"))
    reader = open_checkpoint(path)
    a = reader.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.hidden_dim, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert (a.max_seq_len, a.rope_theta, a.norm_eps) == (8192, 100000.0, 1e-5)
    storage = reader.storage()  # type: ignore[attr-defined]
    assert storage["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and storage["tied_embeddings"]
    assert reader.tokenizer_path is not None and reader.tokenizer_path.name == "tokenizer.json"  # gpt2: tokenizers
    oracle = _gguf_oracle(path)
    wanted = {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.29.feed_forward.w2.weight"}
    for name, tensor in reader.iter_tensors():
        if name in wanted:
            wanted.discard(name)
            expected = oracle[layout_gguf(name)][1]
            assert torch.equal(tensor, torch.from_numpy(expected)), name
        if not wanted:
            break
    assert not wanted


def layout_gguf(meta_name: str) -> str:
    from llamactl.layout import meta_to_gguf

    name = meta_to_gguf(meta_name)
    assert name is not None
    return name


# ----------------------------------------------------------------------------- writing


def test_stories260k_export_reads_in_gguf_and_transformers(tmp_path: Path, stories_dir: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    out = convert(stories_dir, tmp_path / "stories.gguf", "gguf")
    reader = gguf.GGUFReader(out)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 4
    assert fields["llama.context_length"].contents() == 4096
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert len(reader.tensors) == 48 and {t.tensor_type.name for t in reader.tensors} == {"F32"}
    tokens = torch.tensor([[1, 403, 407, 261, 378]])
    hf = convert(stories_dir, tmp_path / "stories-hf", "hf")
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        hf_logits = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(tokens).logits
    assert (_transformers_gguf(out, tokens) - hf_logits).abs().max().item() <= 1e-4
    assert torch.equal(_ours(out, tokens), _ours(stories_dir, tokens))
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tok("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]


def test_tiny_chat_model_with_llama2_tokenizer(tmp_path: Path, llama2_tokenizer: Path) -> None:
    """Real Llama 2 vocabulary: transformers' tokenizer from the GGUF gives the same ids, and the
    embedded chat template renders Meta's [INST] format exactly."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from llamactl.templates import Message
    from llamactl.templates.llama2 import encode_dialog
    from llamactl.tokenizer import load_tokenizer

    args = tiny_args(vocab_size=32000)
    state = random_meta_state(args, seed=9)
    src = write_meta_checkpoint(tmp_path / "tiny-chat", args, state, tokenizer=llama2_tokenizer)
    out = convert(src, tmp_path / "tiny-chat.gguf", "gguf")
    tokens = _tokens(32000)
    with torch.no_grad():
        expected = hf_reference_model(args, state)(tokens).logits
    assert (_transformers_gguf(out, tokens) - expected).abs().max().item() <= 1e-4
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    for text in TEXTS:
        if "  " not in text:
            assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    # transformers' GGUF sentencepiece builder splits runs of spaces unlike SentencePiece; it
    # does so for a vocabulary written the llama.cpp way too, so our file is not the cause.
    reference = write_reference_gguf(tmp_path / "ref.gguf", args, state, tokenizer=llama2_tokenizer)
    ref_tok = AutoTokenizer.from_pretrained(reference.parent, gguf_file=reference.name)
    assert all(tok(t)["input_ids"] == ref_tok(t)["input_ids"] for t in TEXTS)
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story."},
    ]
    meta_ids = encode_dialog(load_tokenizer(llama2_tokenizer), [Message(**m) for m in dialog])
    rendered = tok.apply_chat_template(dialog, tokenize=False)
    ids = []  # Meta encodes each exchange on its own: BOS + text (+ EOS)
    for exchange in rendered.split("<s>")[1:]:
        text, closed, _ = exchange.partition("</s>")
        ids += [1, *sp.encode(text), *([2] if closed else [])]
    assert ids == meta_ids


def test_meta_gguf_hf_round_trip_is_bit_exact(tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = tiny_args()
    src = write_meta_checkpoint(
        tmp_path / "meta", args, random_meta_state(args, seed=6), mp=2, tokenizer=tiny_tokenizer
    )
    out = convert(src, tmp_path / "m.gguf", "gguf")
    via = convert(out, tmp_path / "via-gguf", "hf")
    direct = convert(src, tmp_path / "direct", "hf")
    with safe_open(via / "model.safetensors", "pt") as a, safe_open(direct / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
    back = convert(out, tmp_path / "back", "meta", shards=2)
    for one, two in zip(load_pth_dir(src), load_pth_dir(back)):
        assert all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((via / "config.json").read_text())["num_key_value_heads"] == 2
    import sentencepiece as spm

    rebuilt = spm.SentencePieceProcessor(model_file=str(via / "tokenizer.model"))
    original = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    assert all(rebuilt.encode(t) == original.encode(t) for t in TEXTS)


@pytest.mark.parametrize(("kind", "dtype"), [("q8_0", None), ("q4_0", "fp16")])
def test_quantized_export_uses_ggufs_own_blocks(tmp_path: Path, kind: str, dtype: str | None) -> None:
    import gguf

    args = tiny_args(multiple_of=32)  # FFN 192: every block projection quantizes
    state = random_meta_state(args, seed=8)
    src = write_meta_checkpoint(tmp_path / "meta", args, state)
    out = convert(src, tmp_path / "q.gguf", "gguf", gguf_type=kind, dtype=dtype)
    reader = gguf.GGUFReader(out)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for t in reader.tensors:
        meta = {layout_gguf(n): n for n in state}[t.name]
        if t.name.endswith("_norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        elif "blk." in t.name:
            assert t.tensor_type == qtype
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(state[meta].numpy(), qtype)), t.name
        else:
            assert t.tensor_type.name == ("F16" if dtype else "F32")
    tokens = _tokens(args.vocab_size)
    assert (_ours(out, tokens) - _transformers_gguf(out, tokens)).abs().max().item() <= 1e-4


def test_rows_that_are_not_whole_blocks_stay_unquantized(tmp_path: Path, stories_dir: Path) -> None:
    plan = plan_convert(stories_dir, tmp_path / "s.gguf", "gguf", gguf_type="q8_0")
    types = {i.name: i.scheme or i.dtype for _, infos in plan.files for i in infos}
    assert types["blk.0.ffn_down.weight"] == "fp32"  # 172 columns: not whole 32-blocks, as llama.cpp falls back
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "fp32"
    assert plan.files[0][0] == "s.gguf"
    with pytest.raises(UsageError, match="--gguf-type q5_k"):
        plan_convert(stories_dir, tmp_path / "s.gguf", "gguf", gguf_type="q5_k")
    with pytest.raises(UsageError, match="applies to the gguf format only"):
        plan_convert(stories_dir, tmp_path / "hf", "hf", gguf_type="q8_0")


def test_gguf_to_gguf_keeps_the_vocabulary_it_does_not_understand(tmp_path: Path) -> None:
    """A gpt2 (BPE) vocabulary, merges and chat template pass through a requantization untouched."""
    import gguf

    args = tiny_args(multiple_of=32)
    vocab = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["t", "0", "1", "t1", "t10"] + [f"w{i}" for i in range(args.vocab_size - 5)],
        "tokenizer.ggml.merges": ["t 1", "t1 0"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    src = write_reference_gguf(tmp_path / "bpe.gguf", args, random_meta_state(args), extra=vocab)
    assert open_checkpoint(src).tokenizer_path.name == "tokenizer.json"  # type: ignore[union-attr]  # byte-level BPE
    out = convert(src, tmp_path / "bpe-q8.gguf", "gguf", gguf_type="q8_0")
    before, after = gguf.GGUFReader(src).fields, gguf.GGUFReader(out).fields
    for key in vocab:
        assert after[key].contents() == before[key].contents() and after[key].types == before[key].types, key
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}


def test_writer_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    """Each tensor the source yields is released before the next one is asked for."""
    args = tiny_args()
    src = write_meta_checkpoint(tmp_path / "meta", args, random_meta_state(args))
    plan = plan_convert(src, tmp_path / "s.gguf", "gguf")
    source_iter = plan.reader.iter_tensors
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = 0

    def watched():  # type: ignore[no-untyped-def]
        nonlocal peak
        for name, stored in source_iter():
            tensor = stored.clone()  # a tensor only the writer can keep alive
            peak = max(peak, sum(ref() is not None for ref in alive))
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    plan.reader.iter_tensors = watched  # type: ignore[method-assign]
    run_convert(plan)
    assert len(alive) == len(random_meta_state(args)) and peak == 0


def test_llama_cpp_runs_our_files(tmp_path: Path, stories_dir: Path) -> None:
    bench = llama_tool("llama-bench")
    for kind in (None, "q8_0", "q4_0"):
        out = convert(stories_dir, tmp_path / f"s-{kind}.gguf", "gguf", gguf_type=kind)
        proc = subprocess.run(
            [str(bench), "-m", str(out), "-p", "8", "-n", "4", "-r", "1", "-t", "1", "-o", "json"],
            env=llama_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        [row] = json.loads(proc.stdout)[:1]
        assert row["model_n_params"] == sum(i.numel for i in open_checkpoint(out).tensor_infos())


def test_llama_cpps_converter_output_reads_with_equal_logits(tmp_path: Path, llama2_tokenizer: Path) -> None:
    """convert_hf_to_gguf.py itself on a transformers checkpoint, then llamactl reads the GGUF."""
    import sys

    script = llama_tool("llama-quantize").parents[2] / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"{script} is not here")
    args = tiny_args(vocab_size=32000)
    state = random_meta_state(args, seed=12)
    hf = write_hf_checkpoint(tmp_path / "hf", args, state)
    (hf / "tokenizer.model").write_bytes(llama2_tokenizer.read_bytes())
    out = tmp_path / "converted.gguf"
    proc = subprocess.run(
        [sys.executable, str(script), str(hf), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.skip(f"convert_hf_to_gguf.py did not run here: {proc.stderr.strip().splitlines()[-1:]}")
    got = dict(open_checkpoint(out).iter_tensors())
    assert all(torch.equal(got[k], state[k]) for k in state)
    tokens = _tokens(32000)
    with torch.no_grad():
        assert (_ours(out, tokens) - hf_reference_model(args, state)(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_q8_0_and_q4_0_files_run_at_native_width(tmp_path: Path, stories_dir: Path, kind: str) -> None:
    """GGUF Q8_0 / Q4_0 blocks are the q8 / q4 schemes' own parts: loaded without dequantizing,
    converted to a native checkpoint without re-quantizing (bit-equal logits), and dequantized
    only for a format of plain weights."""
    gguf_file = convert(stories_dir, tmp_path / "s.gguf", "gguf", gguf_type=kind)
    reader = open_checkpoint(gguf_file)
    assert reader.quant is not None and reader.quant.scheme == kind[:2]
    native = convert(gguf_file, tmp_path / "native", "native")
    plain = convert(gguf_file, tmp_path / "hf", "hf")
    tokens = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        at_width = load_model(gguf_file, device="cpu").model
        assert type(at_width.layers[0].attention.wqkv).__name__ == "NativeLinear"  # wq|wk|wv joined
        assert torch.equal(at_width(tokens), load_model(native, device="cpu").model(tokens))
        dequantized = load_model(DequantizedView(reader), device="cpu", dtype=torch.float32).model(tokens)
        assert torch.equal(load_model(plain, device="cpu", dtype=torch.float32).model(tokens), dequantized)
