"""Bad input gets one clear error (UltraSpeedError), never a traceback from deep inside."""

import json

import pytest

from tests.helpers import hf_model, save_checkpoint
from ultraspeed.cli import main
from ultraspeed.errors import UltraSpeedError
from ultraspeed.loader import load_model

pytest.importorskip("transformers")


@pytest.fixture()
def checkpoint(tmp_path):
    path = save_checkpoint(hf_model("llama"), tmp_path / "m")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={chr(97 + i): i for i in range(26)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_valid_checkpoint_loads(checkpoint):
    loaded = load_model(checkpoint)
    assert loaded.config.arch == "llama"


def test_unknown_architecture(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "not_a_model"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UltraSpeedError, match="unknown architecture 'not_a_model'"):
        load_model(checkpoint)


def test_truncated_weights(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UltraSpeedError, match="corrupt or truncated"):
        load_model(checkpoint)


def test_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(UltraSpeedError, match="no .safetensors"):
        load_model(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(UltraSpeedError, match="layers.1.mlp.down_proj.weight"):
        load_model(checkpoint)


def test_missing_shard(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UltraSpeedError, match="missing"):
        load_model(checkpoint)


def test_truncated_gguf(tmp_path, monkeypatch):
    from ultraspeed.loader import default_model_path
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:1_000_000])
    monkeypatch.setenv("ULTRASPEED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UltraSpeedError):
        load_model(bad)


def test_cli_errors_are_one_line(capsys, checkpoint):
    capsys.readouterr()                                        # drop the fixture's own output
    assert main(["generate", "hi", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ultraspeed: error:")
    long_prompt = "a " * 400                                   # tiny model context: 256 positions
    assert main(["generate", long_prompt, "--model", str(checkpoint), "--raw", "--no-spec"]) == 2
    assert "does not fit the context" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(checkpoint), "--max-tokens", "0"]) == 2
