import math

import pytest
import torch

from experiments.tasks import (
    IGNORE_INDEX,
    TASKS,
    TaskBatch,
    TaskError,
    accuracy,
    accuracy_report,
    exact_match,
    make_task,
)

SMALL = {
    "mqar": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "test_examples": 8},
    "selective_copy": {"vocab_size": 8, "seq_len": 32, "num_data_tokens": 4, "test_examples": 8},
    "induction": {"vocab_size": 8, "seq_len": 16, "test_multipliers": (1, 2, 4), "test_examples": 8},
    "passkey": {"seq_len": 128, "num_digits": 4, "test_examples": 4},
}


@pytest.fixture(params=sorted(TASKS))
def task(request):
    return make_task(request.param, **SMALL[request.param])


def test_every_task_has_small_options():
    assert set(SMALL) == set(TASKS)


def test_shapes_dtypes_vocab(task):
    x, y = task.train_batch(5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, task.seq_len) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < task.vocab_size
    answers = y[y != IGNORE_INDEX]
    assert answers.numel() > 0 and int(answers.min()) >= 0 and int(answers.max()) < task.vocab_size


def test_seeded_reproducibility(task):
    a = task.train_batch(4, 123)
    b = task.train_batch(4, torch.Generator().manual_seed(123))
    c = task.train_batch(4, 124)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    g = torch.Generator().manual_seed(5)
    first, second = task.train_batch(4, g), task.train_batch(4, g)
    assert not torch.equal(first[0], second[0])


def test_test_set_is_fixed(task):
    again = make_task(task.name, **SMALL[task.name])
    ts1, ts2 = task.test_set(), again.test_set()
    assert [b.name for b in ts1] == [b.name for b in ts2] and len(ts1) == len(task.test_slices())
    for b1, b2 in zip(ts1, ts2, strict=True):
        assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)
        assert b1.inputs.shape == (SMALL[task.name]["test_examples"], b1.attrs["seq_len"])
    assert task.test_set() is ts1  # cached
    other = task.test_set(seed=1)
    assert not torch.equal(other[0].inputs, ts1[0].inputs)
    train_x, _ = task.train_batch(ts1[0].inputs.shape[0], 0)
    if train_x.shape == ts1[0].inputs.shape:
        assert not torch.equal(train_x, ts1[0].inputs)


def test_perfect_predictions_and_evaluate(task):
    ts = task.test_set()
    perfect = [torch.where(b.targets == IGNORE_INDEX, 0, b.targets) for b in ts]
    rep = accuracy_report(perfect, ts)
    assert rep["accuracy"] == 1.0 and rep["exact_match"] == 1.0
    assert all(s["accuracy"] == 1.0 for s in rep["slices"].values())

    def oracle(inputs):  # logits that put the answer on top, found by matching the inputs in the test set
        for b in ts:
            if b.inputs.shape[1] == inputs.shape[1]:
                same = (b.inputs[:, None, :] == inputs[None, :, :]).all(-1)  # (N, b)
                if same.any(0).all():
                    t = b.targets[same.float().argmax(0)].clamp(min=0)
                    return torch.nn.functional.one_hot(t, task.vocab_size).float()
        raise AssertionError

    assert task.evaluate(oracle, batch_size=3)["accuracy"] == 1.0


def test_describe_is_json(task):
    import json

    d = task.describe()
    json.dumps(d)
    assert d["task"] == task.name and d["vocab_size"] == task.vocab_size


def _batch(targets, attrs=None):
    t = torch.tensor(targets)
    return TaskBatch(torch.zeros_like(t), t, attrs or {})


def test_accuracy_helpers_known_values():
    b = _batch([[-100, 3, 4], [-100, -100, 5]])
    assert accuracy(torch.tensor([[9, 3, 4], [9, 9, 5]]), b) == 1.0
    assert accuracy(torch.tensor([[0, 3, 0], [0, 0, 5]]), b) == pytest.approx(2 / 3)
    assert exact_match(torch.tensor([[0, 3, 0], [0, 0, 5]]), b) == 0.5
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 3, 0], [0, 0, 0]]), 6).float()  # (B, T, V)
    assert accuracy(logits, b) == pytest.approx(1 / 3)
    assert accuracy(logits, (b.inputs, b.targets)) == accuracy(logits, b.targets) == pytest.approx(1 / 3)
    assert math.isnan(accuracy(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), -100)))
    with pytest.raises(TaskError, match="shape"):
        accuracy(torch.zeros(2, 4, dtype=torch.long), b)


def test_accuracy_report_slices_and_attributes():
    ts = [
        _batch([[1, -100], [2, -100]], {"seq_len": 2, "depth": 0.0}),
        _batch([[-100, 1, 1], [-100, 2, 2]], {"seq_len": 3, "depth": 0.0}),
        _batch([[-100, 1, 1], [-100, 2, 2]], {"seq_len": 3, "depth": 1.0}),
    ]
    outs = [
        torch.tensor([[1, 0], [0, 0]]),  # 1 of 2
        torch.tensor([[0, 1, 1], [0, 2, 0]]),  # 3 of 4, 1 of 2 exact
        torch.tensor([[0, 1, 1], [0, 2, 2]]),  # 4 of 4
    ]
    rep = accuracy_report(outs, ts)
    assert rep["accuracy"] == pytest.approx(8 / 10) and rep["answers"] == 10 and rep["examples"] == 6
    assert rep["exact_match"] == pytest.approx(4 / 6)
    assert rep["slices"]["seq_len=2,depth=0.0"]["accuracy"] == 0.5
    assert rep["slices"]["seq_len=3,depth=0.0"]["exact_match"] == 0.5
    assert rep["by"]["seq_len"] == {2: 0.5, 3: pytest.approx(7 / 8)}
    assert rep["by"]["depth"] == {0.0: pytest.approx(4 / 6), 1.0: 1.0}
    with pytest.raises(TaskError, match="one per slice"):
        accuracy_report(outs[:2], ts)


def test_make_task_errors():
    with pytest.raises(TaskError, match=r"unknown task 'mqr'.*did you mean 'mqar'.*the tasks are mqar, selective_copy"):
        make_task("mqr")
    with pytest.raises(
        TaskError, match=r"unknown option\(s\) num_pairs for the 'mqar' task; its options are .*num_kv_pairs=4"
    ):
        make_task("mqar", num_pairs=3)
    with pytest.raises(TaskError, match="too short for num_kv_pairs"):
        make_task("mqar", seq_len=16, num_kv_pairs=8)
    with pytest.raises(TaskError, match="raise vocab_size"):
        make_task("mqar", vocab_size=8, num_kv_pairs=8)
    with pytest.raises(TaskError, match="seq_len=10 must be >= 2 \\* num_data_tokens"):
        make_task("selective_copy", seq_len=10, num_data_tokens=8)
    with pytest.raises(TaskError, match="raise seq_len to at least"):
        make_task("passkey", seq_len=20)
    with pytest.raises(TaskError, match="batch_size"):
        make_task("induction").train_batch(0)
