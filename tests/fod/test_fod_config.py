"""One default per parameter: Config drives the CLI and the TOML run files; a run folder reproduces its run."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers

from fod import checkpoint as C
from fod import config as CF
from fod.cli import build_parser, main, resolve_config
from fod.synthetic import make_dataset

TINY = [*helpers.TINY, "--heatmaps", "0"]


def _value(name):
    base, is_list, optional = CF.field_type(name)
    scalar = {bool: st.booleans(), int: st.integers(-5, 10**6), str: st.text(max_size=12),
              float: st.floats(allow_nan=False, allow_infinity=False)}[base]
    s = st.lists(scalar, min_size=1, max_size=3) if is_list else scalar
    return st.one_of(st.none(), s) if optional else s


@settings(max_examples=60)
@given(st.fixed_dictionaries({name: _value(name) for name in CF.FIELDS}))
def test_toml_round_trip(values):
    cfg = CF.Config(**values)
    path_text = CF.to_toml(cfg)
    back = CF.from_dict(__import__("tomllib").loads(path_text))
    assert back == cfg


def test_none_fields_default_to_none():
    """TOML has no null: a None field is left out of the file, which is right only if None is its default."""
    for name, f in CF.FIELDS.items():
        if CF.field_type(name)[2]:
            assert f.default is None, name


def test_every_model_and_run_field_is_an_option_with_no_default_of_its_own():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["train"]
    dests = {a.dest: a for a in sub._actions}
    for name, f in CF.FIELDS.items():
        a = dests.get("cfg_" + name)
        assert a is not None, f"Config.{name} has no train option"
        assert a.default is None, f"--{name} has a default of its own ({a.default!r}); Config holds the defaults"
        assert f.metadata["help"].split(";")[0].split("(")[0].strip() in a.help, name


def test_command_line_beats_config_file_beats_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "x"\nepochs = 7\nlr = 0.25\nlevels = ["layer1"]\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--output", "o", "--lr", "0.5"])
    cfg = resolve_config(args)
    assert (cfg.data, cfg.epochs, cfg.lr, cfg.levels, cfg.batch_size) == ("x", 7, 0.5, ["layer1"], 8)


@pytest.mark.parametrize("text,needle", [("epochs = 'ten'\n", "epochs"), ("colour = 1\n", "colour"),
                                         ("lr = [1]\n", "lr"), ("epochs = \n", "TOML")])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text('data = "x"\n' + text)
    assert main(["train", "--config", str(f), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fod train: error:") and needle in err and str(f) in err
    assert not (tmp_path / "o").exists()


def test_missing_data_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path / "o")]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_resume_may_change_only_the_mutable_fields():
    a = CF.Config(data="d")
    for name in CF.FIELDS:
        b = dataclasses.replace(a)
        v = getattr(a, name)
        setattr(b, name, (not v) if isinstance(v, bool) else (v or 0) + 1 if isinstance(v, (int, float))
                else ["x"] if v is None else v + "x")
        assert bool(CF.resume_differences(a, b)) == (name not in CF.RESUME_MUTABLE), name


def test_run_folder_config_reproduces_the_run(tmp_path):
    data = make_dataset(tmp_path / "cat", size=32, n_train=5, n_test_good=2, n_test_defect=1, seed=1)
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        assert main(["train", "--data", str(data), "--output", str(a), *TINY, "--epochs", "2", "--seed", "3"]) == 0
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        assert main(["train", "--config", str(a / "config.toml"), "--output", str(b)]) == 0
    assert (a / "config.toml").read_text() == (b / "config.toml").read_text()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert ma[k] == mb[k]
    ca, cb = (C.load_raw(d / "checkpoint.pt") for d in (a, b))
    for k in ca["models"]:
        assert torch.equal(ca["models"][k], cb["models"][k]), k
