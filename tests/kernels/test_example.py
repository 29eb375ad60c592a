"""examples/patch_autoencoder.py (I2Correlation in a model that is not FOD) runs end to end, briefly."""
import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "patch_autoencoder.py"


def _load():
    spec = importlib.util.spec_from_file_location("patch_autoencoder", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patches_are_row_major_on_the_grid():
    pa = _load()
    img = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    tok = pa.patchify(img)
    assert tok.shape == (1, 64, 16)
    assert tok[0, 1, 0] == 4 and tok[0, 8, 0] == 4 * 32  # token 1: row 0, column 1; token 8: row 1, column 0
    assert torch.equal(pa.unpatchify(tok), img)


def test_example_runs_briefly(capsys):
    pa = _load()
    threads = torch.get_num_threads()
    try:
        res = pa.main(["--steps", "3"])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread for its tiny model
    out = capsys.readouterr().out
    assert set(res) == {"plain", "i2c", "i2c+minimax"} and "relative to plain attention" in out
    for kind, (err, ent) in res.items():
        assert math.isfinite(err) and 0 < err < 2, (kind, err)
        if kind != "plain":
            assert 0 < ent <= math.log(64) + 1e-4, (kind, ent)
