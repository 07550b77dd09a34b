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


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--temperature", "inf"], ["--threads", "-1"],
                                   ["--top-p", "nan"], ["--block-size", "1"], ["--max-tokens", "0"]])
def test_bad_flag_values_are_refused_before_anything_loads(capsys, flags):
    assert main(["generate", "hi", "--model", "/no/such/model", *flags]) == 2    # the flag, not the path
    err = capsys.readouterr().err
    assert "argument" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["build-lookup-corpus", "--out", "x.npz", "--batch", "0"],
                                     ["train-drafter", "--gen-batch", "0"], ["qat", "--checkpoint-every", "0"],
                                     ["bench", "acceptance", "--prompts", "0"], ["bench", "speed", "--repeats", "0"],
                                     ["build-lookup-corpus", "--out", "x.npz", "--prompts", "-1", "0", "0", "0"]])
def test_counts_that_would_hang_divide_by_zero_or_slice_are_refused(command):
    assert main(command) == 2


def write_json(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.mark.parametrize("file,content,match", [
    ("config.json", [1, 2], "expected a JSON object"),
    ("config.json", "{bad json", "config.json: cannot read it as JSON"),
    ("config.json", "drop num_hidden_layers", "no field 'num_hidden_layers'"),
    ("tokenizer.json", "garbage", "tokenizer.json: not a tokenizer"),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json: cannot read it as JSON"),
])
def test_a_malformed_model_directory_names_the_file(checkpoint, file, content, match):
    if content == "drop num_hidden_layers":
        cfg = json.loads((checkpoint / "config.json").read_text())
        del cfg["num_hidden_layers"]
        content = cfg
    write_json(checkpoint / file, content)
    with pytest.raises(UltraSpeedError, match=match):
        load_model(checkpoint)


def test_a_chat_template_that_does_not_parse_is_one_error(checkpoint, capsys):
    write_json(checkpoint / "tokenizer_config.json", {"chat_template": "{% if %}"})
    assert main(["generate", "abc", "--model", str(checkpoint), "--no-spec", "--max-tokens", "2"]) == 2
    assert "chat template does not parse" in capsys.readouterr().err


def test_a_drafter_for_another_model_is_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    from ultraspeed.drafters import DEFAULT_DRAFTER
    from ultraspeed.models.dflash import load_drafter
    target = load_model(checkpoint).config
    with pytest.raises(UltraSpeedError, match="trained for another model.*hidden size 576"):
        load_drafter(DEFAULT_DRAFTER, target=target)
    load_drafter(DEFAULT_DRAFTER)                                  # without a target to check against: loads
    from safetensors import safe_open
    with safe_open(str(DEFAULT_DRAFTER), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(DEFAULT_DRAFTER))
    del state["norm.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(UltraSpeedError, match="do not match its own dflash_config"):
        load_drafter(tmp_path / "missing.safetensors")


def test_quantize_never_overwrites_a_model(checkpoint, tmp_path, capsys):
    before = (checkpoint / "model.safetensors").read_bytes()
    assert main(["quantize", str(checkpoint), str(checkpoint)]) == 2
    assert "is the input model" in capsys.readouterr().err
    other = save_checkpoint(hf_model("qwen2"), tmp_path / "other")
    assert main(["quantize", str(checkpoint), str(other)]) == 2
    assert "already holds another model's checkpoint" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["quantize", str(checkpoint), str(tmp_path / "a-file")]) == 2
    assert (checkpoint / "model.safetensors").read_bytes() == before
    out = tmp_path / "q"
    assert main(["quantize", str(checkpoint), str(out)]) == 0
    assert main(["quantize", str(checkpoint), str(out)]) == 0        # its own earlier output may be rewritten
    assert not list(out.glob("*.partial")) and load_model(out).config.arch == "llama"


def test_an_unwritable_output_is_refused_before_the_work(capsys):
    assert main(["build-lookup-corpus", "--out", "/proc/no/such/c.npz", "--model", "/no/such/model"]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err
    assert main(["bench", "report", "--out-dir", "/proc/x", "--model", "/no/such/model"]) == 2


def test_generate_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "ultraspeed", "generate", "Count from one to fifty: one, two,",
                             "--raw", "--no-spec", "--max-tokens", "64", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()                       # `| head -c 1`
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141 and "Traceback" not in err and "BrokenPipe" not in err
