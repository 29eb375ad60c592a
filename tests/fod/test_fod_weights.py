"""--weights FILE: strict loading of the tensors the backbone uses, the key layouts users have, clear errors."""
import argparse
import re
import warnings

import pytest
import timm
import torch

from fod.backbone import Backbone, WeightsError
from fod.upgrade import upgrade

LEVELS = ["layer1", "layer2"]


def _random_state_dict(name, seed=1):
    """A state dict of ``name`` with random values (no slow weight initialisation)."""
    with torch.device("meta"):
        shapes = timm.create_model(name, pretrained=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
            for k, v in shapes.items()}


@pytest.fixture(scope="module")
def r18():
    return _random_state_dict("resnet18")


def _bb(path, name="resnet18", levels=LEVELS):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a local file is not random init: no warning
        return Backbone(name, levels, weights=str(path))


def _same(bb, sd, prefix=""):
    net = bb.net.state_dict()
    for k in ("conv1.weight", "layer1.0.bn1.running_mean", "layer2.1.conv2.weight"):
        assert torch.equal(net[k], sd[prefix + k]), k


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "model_state_dict", "module.", "compiled",
                                    "training checkpoint", "safetensors", "backbone part only"])
def test_layouts_users_have(tmp_path, r18, layout):
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "plain":
        torch.save(r18, path)
    elif layout in ("state_dict", "model", "model_state_dict"):
        torch.save({layout: r18, "epoch": 90}, path)
    elif layout == "module.":
        torch.save({"state_dict": {"module." + k: v for k, v in r18.items()}}, path)
    elif layout == "compiled":
        torch.save({"_orig_mod." + k: v for k, v in r18.items()}, path)
    elif layout == "training checkpoint":  # torchvision's reference scripts keep argparse options beside the model
        torch.save({"model": r18, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in r18.items()}, str(path))
    else:  # only what layer1 + layer2 need
        torch.save({k: v for k, v in r18.items() if not k.startswith(("layer3", "layer4", "fc"))}, path)
    if layout == "training checkpoint":  # never unpickled in full: refused, naming the conversion; converted, read
        new = tmp_path / "w.safetensors"
        with pytest.raises(WeightsError, match=re.escape(f"fod checkpoint upgrade {path} {new} --trust")):
            _bb(path)
        path = upgrade(path, new, trust=True)
    bb = _bb(path)
    _same(bb, r18)
    assert bb.weights_source == f"local file {path}"
    if layout == "plain":
        assert "not needed by the chosen levels (fc, layer3, layer4)" in bb.weights_note


def test_flattened_module_names_of_features_only_models(tmp_path):
    """timm's features_only wrapper renames stages.0 -> stages_0 for some models; the file's names still fit."""
    sd = _random_state_dict("convnext_atto", 2)
    torch.save(sd, tmp_path / "c.pth")
    bb = _bb(tmp_path / "c.pth", "convnext_atto", ["stages.1"])
    net = bb.net.state_dict()
    assert "stages_1.blocks.0.conv_dw.weight" in net
    assert torch.equal(net["stages_1.blocks.0.conv_dw.weight"], sd["stages.1.blocks.0.conv_dw.weight"])
    assert torch.equal(net["stem_0.weight"], sd["stem.0.weight"])


def test_unrelated_keys_are_an_error_naming_them(tmp_path):
    """Such a file used to leave the backbone random and the run exit 0 saying "weights: local file"."""
    torch.save({"encoder.foo": torch.zeros(3), "decoder.bar": torch.ones(2)}, tmp_path / "u.pth")
    with pytest.raises(WeightsError, match=r"u\.pth does not fit backbone 'resnet18'.*missing: .*conv1\.weight.*"
                                           r"does not have: decoder\.bar, encoder\.foo"):
        _bb(tmp_path / "u.pth")


def test_another_architecture_is_an_error(tmp_path, r18):
    r34 = _random_state_dict("resnet34")
    torch.save({k: v for k, v in r34.items() if k.startswith(("conv1", "bn1", "layer1", "layer2"))}, tmp_path / "a.pth")
    with pytest.raises(WeightsError, match=r"does not have: layer1\.2\.bn1\.bias"):
        _bb(tmp_path / "a.pth")
    r50 = _random_state_dict("resnet50")
    torch.save({k: v for k, v in r50.items() if k.startswith(("conv1", "bn1", "layer1"))}, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"another shape: layer1\.0\.bn1\.bias \(64,\) .*\(expected|does not have"):
        _bb(tmp_path / "b.pth")
    # resnet18 weights for resnet34: tensors it needs are missing
    torch.save(r18, tmp_path / "c.pth")
    with pytest.raises(WeightsError, match=r"missing: layer1\.2\.bn1\.bias"):
        _bb(tmp_path / "c.pth", "resnet34")


def test_missing_and_nonfinite_tensors(tmp_path, r18):
    sd = {k: v for k, v in r18.items() if not k.startswith("layer2.1.")}
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(WeightsError, match=r"tensor\(s\) the backbone needs are missing: layer2\.1\.bn1\.bias"):
        _bb(tmp_path / "m.pth")
    sd = dict(r18)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].clone()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "n.pth")
    with pytest.raises(WeightsError, match=r"NaN or infinite values in layer1\.0\.conv1\.weight"):
        _bb(tmp_path / "n.pth")
    # the head may be anything (e.g. fine-tuned to 10 classes): it is not used
    sd = dict(r18)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(sd, tmp_path / "h.pth")
    _same(_bb(tmp_path / "h.pth"), r18)


def test_unreadable_files_are_clear_errors(tmp_path, r18):
    torch.save(r18, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_bytes(b"this is not a weights file\n" * 10)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "nodict.pth")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "dir.pth").mkdir()
    for name, needle in [("empty.pth", "is empty"), ("trunc.pth", "truncated, damaged"), ("text.pth", "truncated"),
                         ("list.pth", "holds a list, not a state dict"), ("nodict.pth", "keys epoch, not a state"),
                         ("w.safetensors", "truncated"), ("dir.pth", "is a folder")]:
        with pytest.raises(WeightsError, match=needle) as e:
            _bb(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        _bb(tmp_path / "missing.pth")


def test_cli_weights_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from fod.cli import main
    from fod.synthetic import make_dataset
    data = make_dataset(tmp_path / "cat", size=32, n_train=2, n_test_good=1, n_test_defect=1)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "u.pth")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--backbone", "resnet18", "--levels", "layer2",
                 "--image-size", "32", "--weights", str(tmp_path / "u.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fod train: error: weights file ") and "u.pth" in err and "\n" not in err
    assert not out.exists()
