"""The norga-continual task (arXiv 2405.14124): its metrics on hand-made predictions, the task
inference on hand-placed embeddings, the task split, frozen finished tasks, and a whole run on
a tiny random BERT."""

import pytest
import torch

from gatelab.experiments.continual import NorgaContinual, continual_scores, infer_tasks, task_split
from gatelab.experiments.spec import Experiment
from gatelab.studies.spec import SpecError
from markers import needs_real_data


def test_continual_scores_by_hand():
    # two tasks, two test glosses each; rows 0-1 belong to task 0, rows 2-3 to task 1
    task_of = torch.tensor([0, 0, 1, 1])
    correct = torch.tensor([True, True, True, False])
    # after task 0 every row is put in task 0; after task 1, row 1 is wrongly put in task 1
    inferred = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]])
    s = continual_scores(task_of, inferred, correct)
    # a[1, 0] = 1/2 (row 1 lost to task 1), a[1, 1] = 1/2 (row 3 misclassified): FAA = 50
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["til_accuracy"] == pytest.approx((100 + 50) / 2)
    assert s["forgetting"] == pytest.approx(100 - 50)  # a[0, 0] = 100 -> a[1, 0] = 50
    assert s["task_inference"] == pytest.approx(75.0)


def test_forgetting_takes_the_best_earlier_accuracy():
    task_of = torch.tensor([0, 1, 2])
    correct = torch.tensor([True, True, True])
    inferred = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 2]])  # task 0 lost after task 1, then regained
    s = continual_scores(task_of, inferred, correct)
    assert s["forgetting"] == pytest.approx((100 - 100 + 100 - 100) / 2)
    assert s["accuracy"] == pytest.approx(100.0)


def test_task_inference_is_the_nearest_class_mean_among_the_tasks_seen():
    means = [torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])]
    x = torch.tensor([[0.1, 1.0], [-2.0, 0.1], [3.0, 0.2]])
    inferred = infer_tasks(x, means)
    assert inferred.tolist() == [[0, 0, 0], [1, 1, 0]]  # after task 0 only task 0 can be named


def test_task_split_is_disjoint_seeded_and_checked():
    split = task_split(20, 5, 4, torch.Generator().manual_seed(3))
    assert sorted(c for t in split for c in t) == list(range(20)) and all(len(t) == 4 for t in split)
    assert split == task_split(20, 5, 4, torch.Generator().manual_seed(3))
    assert split != task_split(20, 5, 4, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="need 24 classes"):
        task_split(20, 6, 4, torch.Generator())


def test_bad_task_counts_name_the_options():
    base = {"kind": "experiment", "name": "cl", "task": "norga-continual", "sizes": [4],
            "arms": [{"name": "a", "options": {"gate": "norga"}}]}
    with pytest.raises(SpecError, match=r"options: tasks x classes_per_task .* got 6 x 4"):
        Experiment.from_dict({**base, "options": {"tasks": 6}})
    arms = [{"name": "a", "options": {"gate": "norga", "activation": "x"}}]
    with pytest.raises(SpecError, match=r"arms\[0\].options: Unknown NoRGa activation 'x'. Valid names"):
        Experiment.from_dict({**base, "arms": arms})


@needs_real_data
def test_training_a_later_task_leaves_a_finished_task_frozen(tiny_backbone):
    from gatelab.experiments.tasks import encoder, gloss_data, prefix_layers, train_classifier
    from gatelab.experiments.text import model_for
    from gatelab.nn.backbone import PrefixTuned
    options = {**NorgaContinual.OPTIONS, "backbone": tiny_backbone, "layers": [1], "test_per_class": 2,
               "pool_per_class": 3, "max_length": 16, "min_steps": 3}
    arm = {**NorgaContinual.ARM_OPTIONS, "gate": "norga", "length": 2}
    pool, states, start = gloss_data(options)
    backbone, g = model_for(tiny_backbone), torch.Generator().manual_seed(0)
    models = [PrefixTuned(backbone, prefix_layers(arm, [1], 32)) for _ in range(2)]
    backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_classifier(encoder(models[0], start, states, pool.mask), models[0], torch.arange(6), pool.labels,
                     20, 32, options, g)
    models[0].requires_grad_(False)
    first = {k: v.clone() for k, v in models[0].layers.state_dict().items()}
    train_classifier(encoder(models[1], start, states, pool.mask), models[1], torch.arange(6, 12),
                     pool.labels, 20, 32, options, g)
    assert all(torch.equal(v, first[k]) for k, v in models[0].layers.state_dict().items())
    assert not all(torch.equal(v, first[k]) for k, v in models[1].layers.state_dict().items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in backbone.state_dict().items())


@needs_real_data
def test_a_tiny_continual_run_gives_consistent_metrics(tiny_backbone):
    options = {"backbone": tiny_backbone, "layers": [1], "test_per_class": 3, "pool_per_class": 3,
               "max_length": 16, "min_steps": 2, "tasks": 3, "classes_per_task": 2}
    task = NorgaContinual()
    task.prepare(options)
    scores = task.run(options, {"gate": "norga", "length": 2}, 2, seed=5)
    assert 0 <= scores["accuracy"] <= scores["til_accuracy"] <= 100
    assert scores["accuracy"] <= scores["task_inference"] <= 100 and scores["forgetting"] >= 0
    again = task.run(options, {"gate": "norga", "length": 2}, 2, seed=5)
    metrics = ("accuracy", "til_accuracy", "forgetting", "task_inference")
    assert [again[k] for k in metrics] == [scores[k] for k in metrics]  # seeded: the same run
