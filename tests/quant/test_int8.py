"""int8 dense weights: a module swap that stays close to fp32 and keeps speculative decoding exact."""

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.speculative import generate_speculative
from ultraspeed.kernels import cpu_gemm
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.quant.int8 import Int8Linear, apply_weight_format, match_drafter_weights

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpu_gemm.is_available(), reason="compiled CPU kernel unavailable")


@torch.no_grad()
def test_swap_is_close_and_exact_for_speculation(tmp_path):
    model = ours_from_hf(hf_model("qwen3", seed=9), tmp_path)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = model.logits(model(ids, model.new_cache(1, 64))[0])
    assert apply_weight_format(model, "int8") == "int8"
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight is not None
    got = model.logits(model(ids, model.new_cache(1, 64))[0])
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4,
                                                    draft_vocab_size=64))
    init_random(drafter)
    drafter.draft_vocab = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(1))[:64]
    keys = set(drafter.state_dict())
    hidden = torch.randn(2, 3, model.config.hidden_size)
    fp32_logits = drafter.draft_logits(hidden, model.lm_head.weight)
    match_drafter_weights(drafter.requires_grad_(False), "int8", model)
    # The draft head is served in int8 too: close to the fp32 rows of the target's head, and not saved.
    assert isinstance(drafter.served_head, Int8Linear) and isinstance(drafter.layers[0].q_proj, Int8Linear)
    int8_logits = drafter.draft_logits(hidden, model.lm_head.weight)
    assert int8_logits.shape == fp32_logits.shape
    assert (int8_logits - fp32_logits).abs().max() < 0.02 * fp32_logits.abs().max()
    assert not any(k.startswith("served_head") for k in drafter.state_dict()) and set(drafter.state_dict()) <= keys
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = [5, 6, 7]
    assert (sum(generate_speculative(model, drafter, prompt, params), [])
            == sum(generate_plain(model, prompt, params), []))


def test_bad_format_rejected(tmp_path):
    model = ours_from_hf(hf_model("llama", seed=1), tmp_path)
    with pytest.raises(ValueError):
        apply_weight_format(model, "int3")
    assert apply_weight_format(model, "fp32") == "checkpoint"
