"""Each generator puts the right answer exactly at the answer positions and -100 everywhere else."""

import torch

from experiments.data import BYTE_TOKENIZER
from experiments.tasks import IGNORE_INDEX, make_task
from experiments.tasks.passkey import NEEDLE, QUESTION


def test_mqar_labels_are_the_values_of_the_queried_keys():
    task = make_task("mqar", vocab_size=128, seq_len=64, num_kv_pairs=8)
    for random_non_queries in (True, False):
        task = make_task("mqar", vocab_size=128, seq_len=64, num_kv_pairs=8, random_non_queries=random_non_queries)
        x, y = task.train_batch(32, 0)
        K, half = 8, 64
        for b in range(32):
            keys, values = x[b, 0 : 2 * K : 2], x[b, 1 : 2 * K : 2]
            assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 128)).all()
            assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K
            pos = (y[b] != IGNORE_INDEX).nonzero().flatten()
            assert len(pos) == K and (pos >= 2 * K).all() and ((pos - 2 * K) % 2 == 0).all()
            assert sorted(x[b, pos].tolist()) == sorted(keys.tolist())  # every key queried once
            for p in pos.tolist():
                j = (keys == x[b, p]).nonzero().item()
                assert y[b, p] == values[j]
            assert (y[b, : 2 * K] == IGNORE_INDEX).all()
            if not random_non_queries:
                rest = torch.ones(64, dtype=torch.bool)
                rest[: 2 * K] = False
                rest[pos] = False
                assert (x[b, rest] == 0).all()


def test_mqar_gaps_follow_a_power_law():
    task = make_task("mqar", vocab_size=512, seq_len=256, num_kv_pairs=4, random_non_queries=False)
    _, y = task.train_batch(512, 0)
    pos = (y != IGNORE_INDEX).nonzero()[:, 1]
    slots = (pos - 8) // 2
    space = (256 - 8) // 2
    near, far = (slots < space // 4).float().mean(), (slots >= 3 * space // 4).float().mean()
    assert near > far  # most queries come soon after the pairs


def test_mqar_test_slices():
    task = make_task("mqar", vocab_size=256, seq_len=32, num_kv_pairs=4, test_examples=4)
    names = [b.name for b in task.test_set()]
    assert "seq_len=32,num_kv_pairs=4" in names and "seq_len=128,num_kv_pairs=16" in names
    assert "seq_len=32,num_kv_pairs=16" not in names  # 4 * 16 > 32: infeasible, left out
    for b in task.test_set():
        assert ((b.targets != IGNORE_INDEX).sum(1) == b.attrs["num_kv_pairs"]).all()


def test_selective_copy_labels_are_the_data_tokens_in_order():
    task = make_task("selective_copy", vocab_size=10, seq_len=64, num_data_tokens=6)
    x, y = task.train_batch(16, 1)
    marker = 9
    for b in range(16):
        region, tail = x[b, :58], x[b, 58:]
        assert (tail == marker).all() and not (region == marker).any()
        data = region[region != 0]
        assert len(data) == 6 and ((data >= 1) & (data < marker)).all()
        assert (y[b, :58] == IGNORE_INDEX).all()
        assert torch.equal(y[b, 58:], data)  # in order of appearance
    starts = [(x[b, :58] != 0).nonzero()[0].item() for b in range(16)]
    assert len(set(starts)) > 1  # positions vary: selective, not fixed-offset copying


def test_induction_label_is_the_token_after_the_first_trigger():
    task = make_task("induction", vocab_size=16, seq_len=40)
    x, y = task.train_batch(64, 2)
    for b in range(64):
        trig = (x[b] == 15).nonzero().flatten().tolist()
        assert len(trig) == 2 and trig[1] == 39 and trig[0] <= 37
        assert y[b, 39] == x[b, trig[0] + 1] and y[b, 39] != 15
        assert (y[b, :39] == IGNORE_INDEX).all()
    test = task.test_set(num_examples=2)
    assert [b.attrs["seq_len"] for b in test] == [40 * 2**k for k in range(7)]
    for b in test:
        assert (b.targets[:, :-1] == IGNORE_INDEX).all() and (b.targets[:, -1] != IGNORE_INDEX).all()


def test_passkey_labels_are_the_key_digits():
    task = make_task("passkey", seq_len=300, num_digits=5)
    x, y = task.train_batch(8, 3)
    assert task.vocab_size == BYTE_TOKENIZER.vocab_size
    for b in range(8):
        text = BYTE_TOKENIZER.decode(x[b])
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and NEEDLE.format(key=key) in text
        assert text.endswith(QUESTION + key[:4])
        labelled = (y[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(295, 300))
        assert BYTE_TOKENIZER.decode(y[b, 295:]) == key


def test_passkey_depth_places_the_needle():
    task = make_task("passkey", seq_len=400, num_digits=5, test_seq_lens=(400,), test_depths=(0.0, 0.5, 1.0))
    ts = task.test_set(num_examples=4)
    assert [b.attrs["depth"] for b in ts] == [0.0, 0.5, 1.0]
    for b in ts:
        for row in b.inputs:
            text = BYTE_TOKENIZER.decode(row)
            start = text.index(" The pass key is ")
            filler = 400 + 1 - len(NEEDLE.format(key="00000")) - len(QUESTION) - 5
            assert start == round(b.attrs["depth"] * filler)
