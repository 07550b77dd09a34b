"""`ultraspeed train-drafter` end to end on the default model, in the format a CPU serves (int8 dense weights):
a fresh drafter starts from the target's last layer, distils, adds teacher-forced text, trains, and writes a
drafter that loads."""

from __future__ import annotations

import torch

from ultraspeed.cli import main
from ultraspeed.loader import load_model
from ultraspeed.models.dflash import load_drafter


def test_a_fresh_drafter_trains_from_the_served_int8_target(tmp_path, capsys):
    out, data = tmp_path / "drafter", tmp_path / "distill"
    assert main(["train-drafter", "--prompts", "1", "1", "0", "0", "--max-new-tokens", "12", "--gen-batch", "2",
                 "--layers", "1", "--features", "2", "--block-size", "4", "--draft-vocab", "512", "--steps", "2",
                 "--seqs-per-step", "1", "--anchors", "2", "--checkpoint-every", "1", "--weights", "auto",
                 "--out", str(out), "--data-dir", str(data), "--corpus-chat", "1", "--corpus-code", "1",
                 "--corpus-dir", str(tmp_path / "corpus"), "--corpus-share", "0.5"]) == 0
    drafter = load_drafter(out / "drafter.safetensors")
    assert drafter.config.num_layers == 1 and drafter.config.block_size == 4
    assert drafter.config.draft_vocab_size == 512
    err = capsys.readouterr().err
    assert "teacher-forced text: 2 sequences" in err and "drafter data: 4 sequences" in err
    # The draft layer began as the target's last layer (copied before the int8 swap dropped the target's dense
    # weights) and two small steps leave it close to that start.
    attn = load_model("default").model.layers[-1].self_attn
    start = attn.qkv_proj.weight[:attn.q_size].float()
    trained = drafter.layers[0].q_proj.weight.float()
    assert torch.nn.functional.cosine_similarity(trained.flatten(), start.flatten(), dim=0) > 0.95
