"""The dewi task: the CNN's shapes, bad arms, and each recipe training above chance on the
real MNIST-5k file."""

import pytest
import torch

from gatelab.experiments.images import DeWiRecipe, SmallCNN
from gatelab.experiments.spec import Experiment
from gatelab.studies.spec import SpecError
from markers import needs_data_wheels


def test_the_cnn_gives_features_and_logits():
    model = SmallCNN(10, 32)
    x = torch.rand(3, 28, 28)
    assert model.features(x).shape == (3, 32) and model(x).shape == (3, 10)


def test_an_unknown_recipe_names_the_valid_ones():
    spec = {"kind": "experiment", "name": "d", "task": "dewi", "sizes": [5],
            "arms": [{"name": "a", "options": {"recipe": "cutmix"}}]}
    with pytest.raises(SpecError, match="Unknown recipe 'cutmix'. Valid names: ce, dewi, mixup"):
        Experiment.from_dict(spec)


@needs_data_wheels
@pytest.mark.parametrize("arm", [{"recipe": "ce"}, {"recipe": "mixup"}, {"recipe": "dewi"},
                                 {"recipe": "dewi", "heads": True}])
def test_each_recipe_trains_above_chance(arm):
    task = DeWiRecipe()
    options = {"epochs": 0, "min_steps": 30, "test_per_class": 50}
    task.prepare(options)
    assert 20 < task.run(options, arm, 5, seed=4)["accuracy"] <= 100  # chance is 10
