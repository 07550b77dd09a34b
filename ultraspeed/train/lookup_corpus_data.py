"""Builds the lookup corpus (engine/lookup_corpus.py) for a target: its greedy answers to training prompts of every
domain, kept with their prompts, in the weight format it is served in. The held-out prompts that `bench
acceptance` measures on are never used (train/prompts.py splits them).

    ultraspeed build-lookup-corpus --prompts 240 400 400 240 --out corpus.npz
"""

from __future__ import annotations

from tqdm import tqdm

from ultraspeed.engine.batch_generate import generate_batch
from ultraspeed.engine.lookup_corpus import LookupCorpus
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.loader import LoadedModel
from ultraspeed.train.prompts import DOMAINS, domain_prompts


def build_lookup_corpus(loaded: LoadedModel, counts: dict[str, int], max_new_tokens: int = 128,
                        max_batch: int = 16) -> LookupCorpus:
    """counts: prompts per domain (training split). Greedy answers, batched; a progress bar per answer."""
    tok = loaded.tokenizer
    prompts = [tok.encode_chat(m) for domain in DOMAINS if counts.get(domain)
               for m in domain_prompts(domain, "train", counts[domain])]
    params = SamplingParams(max_tokens=max_new_tokens)
    with tqdm(total=len(prompts), desc="lookup corpus", unit="answer") as bar:
        answers = generate_batch(loaded.model, prompts, params, tok.stop_token_ids, max_batch,
                                 on_finish=lambda i, tokens: bar.update(1))
    return LookupCorpus.build([p + a for p, a in zip(prompts, answers)])
