"""The WordNet loader on a small fixture file written here, and on the real file where
Debian's wordnet-base is installed."""

import pytest

from gatelab.data import noun_glosses, supersense_dataset
from markers import needs_wordnet

FIXTURE = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)
00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept formed by extracting common features from specific examples
01313093 05 n 01 dog 0 001 @ 01317541 n 0000 | a member of the genus Canis; "the dog barked all night"
01317541 05 n 01 domestic_animal 0 000 | any of various animals that have been tamed
07555863 13 n 0a food 0 nutrient 0 a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 000 | any substance that can be metabolized by an animal to give energy
"""  # noqa: E501


@pytest.fixture
def fixture_path(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(FIXTURE)
    return path


def test_glosses_words_and_supersenses_by_hand(fixture_path):
    glosses = noun_glosses(fixture_path)
    assert [g.offset for g in glosses] == [1740, 2137, 1313093, 1317541, 7555863]
    assert [g.supersense for g in glosses] == ["Tops", "Tops", "animal", "animal", "food"]
    assert glosses[1].words == ("abstraction", "abstract_entity")
    assert len(glosses[4].words) == 10 and glosses[4].words[-1] == "h"  # w_cnt is hex
    assert glosses[2].gloss == 'a member of the genus Canis; "the dog barked all night"'


def test_dataset_keeps_supersenses_with_enough_glosses(fixture_path):
    texts, labels, names = supersense_dataset(min_count=2, path=fixture_path)
    assert names == ["Tops", "animal"] and labels == [0, 0, 1, 1]
    assert texts[3] == "any of various animals that have been tamed"


def test_missing_file_and_bad_lines_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GATELAB_WORDNET", raising=False)
    with pytest.raises(FileNotFoundError, match="install Debian's wordnet-base|Install Debian's"):
        noun_glosses(tmp_path / "nope")
    bad = tmp_path / "bad.noun"
    bad.write_text("00001740 03 v 01 entity 0 000 | a verb line\n")
    with pytest.raises(ValueError, match=r"bad.noun, line 1: not a WordNet noun synset line"):
        noun_glosses(bad)


@needs_wordnet
def test_the_real_file_has_82k_glosses_and_20_large_supersenses():
    glosses = noun_glosses()
    assert len(glosses) == 82115
    assert len({g.supersense for g in glosses}) == 26
    _, labels, names = supersense_dataset()
    assert len(names) == 20 and len(labels) == sum(1 for g in glosses if g.supersense in names)
