"""GGUF export run by llama.cpp itself (llama-cpp-python), against the merged Hugging Face model.

The export checks its file through transformers' GGUF reader; this is the reader people use. For an exported run
it compares llama.cpp's tokenizer with the run's on sample texts, llama.cpp's logits with the merged model's over
a text, and both models' greedy continuations of a few prompts.
Needs `pip install llama-cpp-python` (builds llama.cpp from source; not a gnlorp dependency).
Run:  python benchmarks/gguf_llama_cpp.py --run RUN [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import add_output_arguments, machine, write_section

PROMPTS = ("What does the Python function `zip` do?", "Explain recursion to a child.", "def fibonacci(n):",
           "The best thing about computers is", "Once upon a time, a small robot")
TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
        "can be supplied to customize the sort order, and the reverse flag can be set to request the result in "
        "descending order.")
NEW_TOKENS = 32


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def hf_greedy(model, ids: list[int]) -> list[int]:
    """argmax at every position, end-of-text included, as cpp_greedy does."""
    tokens = torch.tensor([ids])
    for _ in range(NEW_TOKENS):
        tokens = torch.cat([tokens, model(input_ids=tokens).logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(ids):].tolist()


def cpp_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def measure(run: Path, gguf_type: str, merged, tokenizer, work: Path) -> str:
    from llama_cpp import Llama

    from gnlorp.export import export_run
    from gnlorp.export.gguf import SAMPLE_TEXTS

    report = export_run(run, work / gguf_type, format="gguf", gguf_type=gguf_type)
    llm = Llama(model_path=str(report.output / f"model-{gguf_type}.gguf"), n_ctx=512, logits_all=True,
                verbose=False, seed=0, n_threads=torch.get_num_threads())
    texts = [*SAMPLE_TEXTS, TEXT]
    same_ids = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)
                   ["input_ids"] for t in texts)
    ids = tokenizer(TEXT)["input_ids"]
    llm.reset()
    llm.eval(ids)
    cpp = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        hf = merged(input_ids=torch.tensor([ids])).logits[0]
    relative = float((cpp - hf).abs().max() / hf.abs().max())
    agree = sum(same_prefix(hf_greedy(merged, prompt_ids(tokenizer, p)), cpp_greedy(llm, prompt_ids(tokenizer, p)))
                for p in PROMPTS)
    argmax = float((cpp.argmax(-1) == hf.argmax(-1)).float().mean())
    return (f"| {run.name} | {gguf_type} | {same_ids}/{len(texts)} | {relative:.2e} | {argmax:.3f} | "
            f"{agree}/{len(PROMPTS) * NEW_TOKENS} |")


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnlorp.export import export_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder (repeatable)")
    args = parser.parse_args()
    lines = ["| Run | GGUF | texts with the run's ids | max abs Δlogit / max abs logit | same argmax | greedy "
             "tokens, same prefix |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for run in args.run:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            export_run(run, work / "hf")
            merged = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(work / "hf")
            for gguf_type in ("f16",) if args.quick else ("f16", "q8_0"):
                lines.append(measure(run, gguf_type, merged, tokenizer, work))
    import llama_cpp

    write_section(args.out, "gguf_llama_cpp", "\n\n".join([
        f"Machine: {machine()}; llama-cpp-python {llama_cpp.__version__}. Command: `python "
        f"benchmarks/gguf_llama_cpp.py {' '.join(f'--run {r}' for r in args.run)}`.", "\n".join(lines)]))


if __name__ == "__main__":
    main()
