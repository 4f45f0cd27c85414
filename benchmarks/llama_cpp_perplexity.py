"""Does llama.cpp compute what transformers computes on a merged DUME checkpoint?

Builds three tiny experts of one base (RoPE base 500, far from every class default), merges them with `dume merge`'s
library call, converts the checkpoint to GGUF (float32) with llama.cpp's own converter, runs llama.cpp's
``llama-perplexity`` on a text, and computes the same perplexity with transformers: the same chunks of ``--ctx``
tokens, each scored on its second half, as llama-perplexity does.

Needs a llama.cpp source tree with ``llama-perplexity`` built (``cmake -B build && cmake --build build -t
llama-perplexity``; the llama-cpp-python sdist carries one in vendor/llama.cpp) and a folder holding the converter's
Python requirements that this environment lacks (transformers 4.57.6, huggingface_hub<1, sentencepiece), given as
``--converter-path``; the venv's torch is reused. See docs/serving.md.

The tiny models use a byte-level BPE tokenizer learnt here, which llama.cpp's converter does not know (it recognises
tokenizers by hashing their output on a probe text); its pre-tokenizer is GPT-2's regex, so the converter is told
"gpt-2". A real Llama 3 or Qwen3 tokenizer is recognised as is and needs no such step.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dume.shared.lab.tiny import (
    SYNTHETIC_TEMPLATES,
    build_tiny_model,
    perturb_mlps,
    synthetic_documents,
    trained_tokenizer,
)
from dume.shared.method.merge import ExpertSpec, merge
from dume.shared.method.routers import MergeSettings

CONVERT = """
import runpy, sys
llama_cpp = sys.argv.pop(1)
sys.path[:0] = [llama_cpp, llama_cpp + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = llama_cpp + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def merged_model(root: Path, family: str) -> Path:
    """Three experts of one tiny base with a BPE tokenizer learnt on the domains (GPT-2's pre-tokenizer regex)."""
    documents = {domain: synthetic_documents(domain, 40) for domain in sorted(SYNTHETIC_TEMPLATES)}
    tokenizer = trained_tokenizer([text for texts in documents.values() for text in texts], vocab_size=320)
    base = build_tiny_model(family, root / "base", tokenizer=tokenizer,
                            rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    specs = []
    for seed, (domain, texts) in enumerate(documents.items(), start=1):
        data = root / f"{domain}.txt"
        data.write_text("\n".join(texts) + "\n")
        expert = perturb_mlps(base, root / domain, seed=seed, scale=0.5)
        tokenizer.save_pretrained(expert)  # perturb_mlps writes the byte tokenizer; keep the base's
        specs.append(ExpertSpec(domain, expert, data))
    return merge(specs, root / "merged", MergeSettings(sequence_length=64))


def transformers_perplexity(model_dir: Path, text: str, ctx: int, add_bos: bool) -> tuple[float, int]:
    """llama-perplexity's protocol: chunks of ``ctx`` tokens (the first replaced by BOS where the vocabulary adds
    one), each scored on its second half."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    losses = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = torch.tensor([ids[start:start + ctx]])
        if add_bos:
            chunk[0, 0] = tokenizer.bos_token_id
        with torch.no_grad():
            logits = model(chunk).logits[0].double()
        first = ctx // 2
        log_probs = torch.log_softmax(logits[first:-1], dim=-1)
        losses += (-log_probs.gather(1, chunk[0, first + 1:, None])).flatten().tolist()
    return math.exp(sum(losses) / len(losses)), len(ids)


def adds_bos(llama_cpp: Path, gguf: Path) -> bool:
    """Whether llama.cpp puts BOS first: the GGUF's flag, else its default for a GPT-2-style BPE vocabulary (no)."""
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree, llama-perplexity built")
    parser.add_argument("--converter-path", type=Path, required=True,
                        help="folder with transformers 4.57.6 and the converter's other requirements")
    parser.add_argument("--ctx", type=int, default=64)
    arguments = parser.parse_args()
    text = "\n".join(document for domain in sorted(SYNTHETIC_TEMPLATES)
                     for document in synthetic_documents(domain, 30, offset=1000))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "text.txt").write_text(text)
        for family in ("llama", "qwen3"):
            model_dir = merged_model(root / family, family)
            gguf = root / f"{family}.gguf"
            environment = {**os.environ, "PYTHONPATH": str(arguments.converter_path), "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, "-c", CONVERT, str(arguments.llama_cpp), str(model_dir), "--outfile",
                            str(gguf), "--outtype", "f32"], env=environment, check=True, capture_output=True)
            run = subprocess.run([str(arguments.llama_cpp / "build" / "bin" / "llama-perplexity"), "-m", str(gguf),
                                  "-f", str(root / "text.txt"), "-c", str(arguments.ctx), "-b", str(arguments.ctx),
                                  "-t", "2"], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"llama-perplexity failed on {family}: {(run.stdout + run.stderr).strip()[-500:]}")
            found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
            chunks = re.search(r"over (\d+) chunks", run.stdout + run.stderr)
            add_bos = adds_bos(arguments.llama_cpp, gguf)
            reference, count = transformers_perplexity(model_dir, text, arguments.ctx, add_bos)
            print(f"{family}: llama.cpp PPL {found.group(1) if found else '?'} over "
                  f"{chunks.group(1) if chunks else '?'} chunks of {arguments.ctx} tokens; transformers PPL "
                  f"{reference:.4f} over {count // arguments.ctx} chunks ({count} tokens)")


if __name__ == "__main__":
    main()
