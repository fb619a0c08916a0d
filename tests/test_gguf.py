"""GGUF export: the file read back by transformers' own GGUF loader and by gguf's reader, against the trained model.

Runs are built as in test_export (a base folder, three training steps, the run folder the engine writes), so the
reference is the model that trained: its logits and its greedy tokens, and the run's tokenizer on sample texts.
The bases cover what the writer must get right: LLaMA with grouped-query attention and a tied head (the k
permutation uses the kv heads; the file then has no output.weight), the untied `tiny` preset trained by the
engine, and Qwen2 (biases on q/k/v, no permutation).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from gnlorp.config import ConfigError
from gnlorp.export import export_run
from gnlorp.export.gguf import GGUF_TOLERANCE, SAMPLE_TEXTS
from gnlorp.models.load import load_tokenizer
from test_export import VOCAB, hidden_leftovers, make_run

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [*SAMPLE_TEXTS, "Le café coûte 3,50 € — 日本語のテキスト.\r\n\ttabs\tand\u00a0nbsp", "<s>whole specials</s>"]


def base_folder(folder: Path, model_class, config, split: str | None = None) -> Path:
    """A small pretrained-looking model folder with the shipped byte-level BPE tokenizer (splitting by `split`)."""
    tokenizer = load_tokenizer("tiny")
    if split is not None:  # as Qwen2's and Llama 3's tokenizer.json do: a regex split, then bytes
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    """A LLaMA with 4 query heads over 2 kv heads and a tied head."""
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=True)
    return base_folder(tmp_path_factory.mktemp("llama"), LlamaForCausalLM, config)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama_base) -> tuple[Path, torch.nn.Module]:
    """GradNormLoRP on llama_base."""
    run = tmp_path_factory.mktemp("llama-run") / "run"
    return run, make_run(run, llama_base, "gradnormlorp")


def read_back(folder: Path, name: str):
    kwargs = {"gguf_file": name, "local_files_only": True}
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval(),
            AutoTokenizer.from_pretrained(folder, **kwargs))


@torch.no_grad()
def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))
    return model.eval()(input_ids=ids).logits


def greedy(model: torch.nn.Module, tokenizer, tokens: int = 12) -> list[int]:
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def check_against(trained: torch.nn.Module, folder: Path, name: str, bound: float, run_tokenizer=None) -> None:
    """Logits within `bound` x the largest |logit|, the same greedy tokens, the run tokenizer's ids."""
    model, tokenizer = read_back(folder, name)
    expected = probe_logits(trained)
    assert (probe_logits(model) - expected).abs().max() <= bound * max(1.0, float(expected.abs().max()))
    run_tokenizer = run_tokenizer or load_tokenizer("tiny")
    assert greedy(model, run_tokenizer) == greedy(trained, run_tokenizer)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"], text


def test_f16_file_reads_back_as_the_trained_model(llama_run, tmp_path):
    run, trained = llama_run
    report = export_run(run, tmp_path / "out", format="gguf")
    assert sorted(report.files) == ["Modelfile", "model-f16.gguf"] and report.format == "gguf"
    check_against(trained, tmp_path / "out", "model-f16.gguf", 1e-2)
    assert report.greedy_equal == report.greedy_total == 16 and report.max_abs_logit_diff <= 1e-2
    types = tensor_types(tmp_path / "out" / "model-f16.gguf")
    assert "output.weight" not in types, "a tied head is the embedding: the file must not carry it twice"
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.1.attn_norm.weight"] == "F32"
    fields = gguf.GGUFReader(tmp_path / "out" / "model-f16.gguf").fields
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "FROM ./model-f16.gguf" in (tmp_path / "out" / "Modelfile").read_text()


def test_q8_0_is_8_5_bits_a_weight_and_within_its_bound(llama_run, tmp_path):
    run, trained = llama_run
    report = export_run(run, tmp_path / "q8", format="gguf", gguf_type="q8_0")
    matrices = [t for t in gguf.GGUFReader(report.output / "model-q8_0.gguf").tensors if len(t.shape) == 2]
    assert {t.tensor_type.name for t in matrices} == {"Q8_0"}
    assert all(t.n_bytes == t.n_elements * 34 // 32 for t in matrices), "32 int8 values and one f16 scale a block"
    check_against(trained, tmp_path / "q8", "model-q8_0.gguf", GGUF_TOLERANCE["q8_0"])


def test_engine_run_of_the_tiny_preset_exports_through_the_cli(tmp_path):
    """The untied `tiny` preset, trained by `gnlorp train`, exported by `gnlorp export --format gguf`."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    train = [sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--method", "lora", "--max-steps", "3",
             "--batch-size", "2", "--seq-len", "32", "--output", str(tmp_path / "run")]
    subprocess.run(train, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    export = [sys.executable, "-m", "gnlorp", "export", "--run", str(tmp_path / "run"), "--output",
              str(tmp_path / "out"), "--format", "gguf"]
    proc = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "16 of 16 greedy tokens equal" in proc.stdout and "model-f16.gguf" in proc.stdout
    assert "output.weight" in tensor_types(tmp_path / "out" / "model-f16.gguf")
    merged = tmp_path / "hf"
    export_run(tmp_path / "run", merged)
    check_against(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tmp_path / "out",
                  "model-f16.gguf", 1e-2)


def test_qwen2_keeps_its_biases_and_unpermuted_rows(tmp_path):
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False)
    base = base_folder(tmp_path / "base", Qwen2ForCausalLM, config, split=QWEN2_SPLIT)
    trained = make_run(tmp_path / "run", base, "full")  # full training moves the q/k/v biases off their zeros
    assert trained.model.layers[0].self_attn.q_proj.bias.abs().max() > 1e-3
    export_run(tmp_path / "run", tmp_path / "out", format="gguf")
    types = tensor_types(tmp_path / "out" / "model-f16.gguf")
    assert types["blk.0.attn_q.bias"] == "F32"
    assert gguf.GGUFReader(tmp_path / "out" / "model-f16.gguf").fields["general.architecture"].contents() == "qwen2"
    assert gguf.GGUFReader(tmp_path / "out" / "model-f16.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
    run_tokenizer = AutoTokenizer.from_pretrained(base)
    assert run_tokenizer("a  b 12345")["input_ids"] != load_tokenizer("tiny")("a  b 12345")["input_ids"], \
        "the check only means something if Qwen2's split differs from GPT-2's"
    check_against(trained, tmp_path / "out", "model-f16.gguf", 1e-2, run_tokenizer)


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, llama_base, llama_run):
    run, _ = llama_run
    make_run(tmp_path / "cls-run", llama_base, "lora", "seq-cls")
    gpt2 = base_folder(tmp_path / "gpt2", GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                        vocab_size=VOCAB, n_positions=64,
                                                                        bos_token_id=1, eos_token_id=2))
    make_run(tmp_path / "gpt2-run", gpt2, "lora")
    cases = [
        (tmp_path / "gpt2-run", {}, "GGUF export supports LLaMA-family causal LMs"),
        (tmp_path / "cls-run", {}, "GGUF export is for causal-lm runs"),
        (run, {"gguf_type": "q4_k"}, "unknown GGUF type 'q4_k'; choose one of: f16, q8_0"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            export_run(source, tmp_path / "out", format="gguf", **kwargs)
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        export_run(run, tmp_path / "full", format="gguf")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"] and not hidden_leftovers(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gnlorp", "export", "--run", str(tmp_path / "gpt2-run"), "--output",
                           str(tmp_path / "cli"), "--format", "gguf"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "GPT2LMHeadModel" in proc.stderr
    assert not (tmp_path / "cli").exists()


def test_a_wrong_layout_is_refused_even_where_the_logits_barely_move(llama_run, tmp_path, monkeypatch):
    """Without llama.cpp's q/k row interleaving the file is wrong for llama.cpp and for transformers' reader; a model
    with near-uniform attention hides that in its logits, so the export also compares every weight read back."""
    import gnlorp.export.gguf_write

    run, _ = llama_run
    monkeypatch.setattr(gnlorp.export.gguf_write, "_interleave_rope_rows", lambda weight, heads: weight)
    with pytest.raises(ConfigError, match=r"q_proj.weight reads back .* more than f16 rounding") as info:
        export_run(run, tmp_path / "out", format="gguf")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists() and not hidden_leftovers(tmp_path)
