import json
import pickle
import sys

import pytest
import torch

from cpcbm_blocks import CheckpointError, LevelSpec, MidSpec, UNet3D, UNetSpec
from cpcbm_blocks.checkpoint import SPEC_FILE, WEIGHTS_FILE, from_pretrained, load_weights, save_pretrained
from cpcbm_blocks.spec import FORMAT_VERSION

from .conftest import randomize_


def _trained(spec: UNetSpec, *, seed: int = 0) -> UNet3D:
    return randomize_(UNet3D(spec), seed=seed)


def test_round_trip_is_bitwise_for_weights_and_outputs(tiny_spec, tmp_path):
    model = _trained(tiny_spec)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UNet3D.from_pretrained(tmp_path / "ckpt")
    assert loaded.spec == tiny_spec
    before, after = model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([3, 700])), loaded(x, torch.tensor([3, 700])))


def test_round_trip_keeps_bfloat16_weights_bitwise(tiny_spec, tmp_path):
    model = _trained(tiny_spec).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.bfloat16 and torch.equal(loaded.state_dict()[key], value)


def test_the_checkpoint_is_a_json_spec_with_a_format_version_and_a_safetensors_file(tiny_spec, tmp_path):
    save_pretrained(_trained(tiny_spec), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SPEC_FILE, WEIGHTS_FILE])
    spec_json = json.loads((tmp_path / SPEC_FILE).read_text())
    assert spec_json["format_version"] == FORMAT_VERSION
    assert UNetSpec.from_dict(spec_json) == tiny_spec
    header_length = int.from_bytes((tmp_path / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((tmp_path / WEIGHTS_FILE).read_bytes()[8:8 + header_length])
    assert "blocks.conv_in.weight" in header and header["__metadata__"] == {"library": "cpcbm_blocks"}


def test_loading_never_unpickles(tiny_spec, tmp_path, monkeypatch):
    save_pretrained(_trained(tiny_spec), tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    from_pretrained(tmp_path)
    load_weights(UNet3D(tiny_spec), tmp_path)


def test_load_weights_into_an_existing_model_copies_them_bitwise(tiny_spec, tmp_path):
    source = _trained(tiny_spec, seed=1)
    save_pretrained(source, tmp_path)
    target = UNet3D(tiny_spec)
    load_weights(target, tmp_path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_loading_into_another_spec_lists_the_differing_fields_and_keys(tiny_spec, tmp_path):
    save_pretrained(_trained(tiny_spec), tmp_path)
    other_spec = UNetSpec(levels=(LevelSpec(channels=8, stride=(2, 2, 2)),
                                  LevelSpec(channels=24, stride=(1, 2, 2), kernel_size=(1, 3, 3))),
                          mid=MidSpec(kernel_size=(1, 3, 3)), num_groups=4, head_channels=4, time_embedding_channels=16)
    model = UNet3D(other_spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, tmp_path)
    message = str(caught.value)
    assert "expected a checkpoint saved from the model's spec" in message
    assert "spec.levels[1].channels: checkpoint 16, model 24" in message
    assert "spec.levels[1].attention: checkpoint True, model False" in message
    assert "unexpected keys (in the checkpoint, not in the model)" in message and "blocks.down2_attn1.qkv.weight" in message
    assert "keys with another shape" in message and "blocks.down2_res1.conv1.weight: checkpoint (16, 8, 1, 3, 3), model (24, 8, 1, 3, 3)" in message
    assert "UNet3D.from_pretrained" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "a refused load changed weights"


def test_a_checkpoint_whose_weights_do_not_fit_its_own_spec_is_refused(tiny_spec, tmp_path):
    save_pretrained(_trained(tiny_spec), tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["mid"]["num_segments"] = 3
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError) as caught:
        from_pretrained(tmp_path)
    assert "missing keys (in the model, not in the checkpoint)" in str(caught.value)
    assert "blocks.mid3_res1.conv1.weight" in str(caught.value)


@pytest.mark.parametrize(("damage", "fragments"), [
    (lambda d: (d / SPEC_FILE).unlink(), ["directory: expected spec.json and model.safetensors", "save_pretrained()"]),
    (lambda d: (d / WEIGHTS_FILE).unlink(), ["directory: expected model.safetensors", "['spec.json']"]),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"not a tensor file"), ["expected a safetensors file", "save it again"]),
    (lambda d: (d / SPEC_FILE).write_text('{"format_version": 99, "levels": []}'), ["format_version", "99"]),
])
def test_damaged_checkpoints_raise_checkpoint_errors(tiny_spec, tmp_path, damage, fragments):
    save_pretrained(_trained(tiny_spec), tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        from_pretrained(tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_saving_something_else_or_weights_without_values_is_refused(tiny_spec, tmp_path):
    with pytest.raises(CheckpointError, match="model: expected a UNet3D, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with torch.device("meta"):
        model = UNet3D(tiny_spec)
    with pytest.raises(CheckpointError, match="on the meta device"):
        save_pretrained(model, tmp_path)


def test_missing_safetensors_tells_the_user_which_extra_to_install(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'pip install "cpcbm-blocks\[io\]"'):
        save_pretrained(UNet3D(tiny_spec), tmp_path)
