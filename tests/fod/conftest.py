"""Fixtures shared by the pipeline tests: factories for a synthetic category and for a tiny training run,
module-scoped so that each module builds its own once and states only what is particular to it (the
options themselves: ``helpers.TINY``)."""
import pytest
from helpers import TINY

from fod.cli import main
from fod.synthetic import make_dataset


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """``category(size=32, n_train=10, n_test_good=2, n_test_defect=1, seed=0)``: a synthetic category in the
    MVTec layout (fod.synthetic.make_dataset) in a fresh temporary folder."""
    def make(*, size=32, n_train=10, n_test_good=2, n_test_defect=1, seed=0, name="cat"):
        return make_dataset(tmp_path_factory.mktemp("syn") / name, size=size, n_train=n_train,
                            n_test_good=n_test_good, n_test_defect=n_test_defect, seed=seed)
    return make


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(data, *options)``: the folder of a `fod train` of ``data`` with ``helpers.TINY`` and ``options``
    (asserted to succeed, with the random-backbone warning)."""
    def run(data, *options, name="run"):
        out = tmp_path_factory.mktemp(name) / name
        with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
            assert main(["train", "--data", str(data), "--output", str(out), *TINY, *options]) == 0
        return out
    return run
