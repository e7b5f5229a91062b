"""Real data sets read from local files (nothing downloads): WordNet noun glosses with
their supersense labels (``wordnet``)."""

from .wordnet import SUPERSENSES, Gloss, noun_glosses, supersense_dataset

__all__ = ["SUPERSENSES", "Gloss", "noun_glosses", "supersense_dataset"]
