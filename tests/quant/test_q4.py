"""A checkpoint whose matrices are 4-bit (a GGUF Q4_1 file, as the default model ships) is served in 4 bits
without changing a number: `--weights q4` packs exactly those matrices with quant/q4.py, the fused CPU layers
run them, and the hidden states match the fp32 PyTorch model's; the rest, and `auto`, keep int8; a checkpoint with
no 4-bit matrix is refused rather than quantized."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.kernels import cpu_gemm
from ultraspeed.kernels.cpu_layer import FusedDenseLayer
from ultraspeed.models.layers import Linear
from ultraspeed.quant.int8 import Int8Linear, apply_weight_format
from ultraspeed.quant.q4 import Q4Linear

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpu_gemm.is_available(), reason="compiled CPU kernels unavailable")


def to_q4_1(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1 round trip: per group of 32, fp16 scale (max - min) / 15 and minimum, codes 0..15."""
    g = w.reshape(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    codes = torch.round((g - m) / torch.where(d > 0, d, 1.0)).clamp(0, 15)
    return (codes * d + m).reshape(w.shape)


@pytest.fixture(scope="module")
def four_bit_model(tmp_path_factory):
    """A tiny Qwen3 (QK-norm) whose decoder-layer matrices are exactly 4-bit, as a Q4_1 GGUF decodes."""
    model = ours_from_hf(hf_model("qwen3", seed=4), tmp_path_factory.mktemp("qwen3"))
    with torch.no_grad():
        for layer in model.layers:
            for m in layer.modules():
                if isinstance(m, Linear):
                    m.weight.copy_(to_q4_1(m.weight))
    return model


def hidden_states(model, steps: list[list[int]]) -> list[torch.Tensor]:
    """A prompt, then decode steps and a verify block: each forward's normed hidden states."""
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        return [model(torch.tensor([ids]), cache)[0] for ids in steps]


STEPS = [[3, 17, 42, 9, 100, 5, 6, 7], [11], [12], [1, 2, 3, 4, 5], [13]]


def test_q4_serves_4bit_matrices_in_4bits_without_changing_the_model(four_bit_model, tmp_path):
    import copy
    served = copy.deepcopy(four_bit_model)
    assert apply_weight_format(served, "q4") == "q4+int8"
    layer = served.layers[0]
    assert isinstance(layer, FusedDenseLayer) and layer._format == 1
    assert isinstance(layer.self_attn.qkv_proj, Q4Linear) and isinstance(layer.mlp.down_proj, Q4Linear)
    assert isinstance(served.lm_head, Int8Linear)        # not 4-bit in the checkpoint: int8, as before
    for got, want in zip(hidden_states(served, STEPS), hidden_states(four_bit_model, STEPS)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_and_int8_keep_int8_and_q4_refuses_a_checkpoint_with_no_4bit_matrix(four_bit_model, tmp_path):
    import copy
    for fmt in ("int8", "auto"):
        served = copy.deepcopy(four_bit_model)
        assert apply_weight_format(served, fmt) == "int8"
        assert isinstance(served.layers[0].self_attn.qkv_proj, Int8Linear)
    fine = ours_from_hf(hf_model("qwen3", seed=4), tmp_path)          # fp32 weights: 4 bits would lose
    with pytest.raises(ValueError, match="none"):
        apply_weight_format(fine, "q4")
    assert not any(isinstance(m, (Q4Linear, Int8Linear)) for m in fine.modules())      # refused: nothing changed
