"""Peer engines measured beside ours on the same machine, prompts and weights.

Each runner takes prompt token ids and a number of new tokens and returns (new_tokens, seconds) for one greedy
generation. A peer that is not installed is reported as missing, never silently skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

Runner = Callable[[list[int], int], tuple[int, float]]


def hf_transformers_runner(gguf_path: Path, prompt_lookup: bool = False) -> Runner:
    """HF transformers `generate` on the same GGUF (dequantized to fp32 by transformers itself)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()

    def run(prompt: list[int], new_tokens: int) -> tuple[int, float]:
        ids = torch.tensor([prompt])
        extra = {"prompt_lookup_num_tokens": 10} if prompt_lookup else {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        return out.shape[1] - ids.shape[1], time.perf_counter() - t0

    return run


def llama_cpp_runner(gguf_path: Path, threads: int, prompt_lookup: bool = False) -> Runner:
    """llama.cpp through llama-cpp-python on the same GGUF file (optional prompt-lookup decoding)."""
    from llama_cpp import Llama
    kwargs = {}
    if prompt_lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=10)
    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=2048, verbose=False, **kwargs)

    def run(prompt: list[int], new_tokens: int) -> tuple[int, float]:
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(prompt=prompt, max_tokens=new_tokens, temperature=0.0, top_k=1)
        return out["usage"]["completion_tokens"], time.perf_counter() - t0

    return run


def available_peers() -> dict[str, str | None]:
    """Peer name -> None if importable, else why not."""
    status = {}
    for name, module in (("hf_transformers", "transformers"), ("llama_cpp", "llama_cpp")):
        try:
            __import__(module)
            status[name] = None
        except ImportError as e:
            status[name] = f"not installed ({e.name}); pip install {'llama-cpp-python' if name == 'llama_cpp' else name}"
    return status
