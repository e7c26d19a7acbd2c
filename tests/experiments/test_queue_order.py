"""The order a study's queued trials are taken in: an interrupted trial's retry before the cells not begun."""

import optuna

from experiments.study import ledger


def test_a_retry_is_taken_before_the_cells_queued_earlier(tmp_path):
    """Cells a, b, c queued; a taken and interrupted; its retry is queued last but taken first (it continues
    from a checkpoint), then b and c in their order."""
    study = optuna.create_study(study_name="s", storage=ledger.make_storage(f"sqlite:///{tmp_path / 's.db'}", None),
                                direction="maximize")
    for cell in ("a", "b", "c"):
        ledger.enqueue(study, {"cell": cell})
    first = ledger.take_waiting(study)
    assert ledger.read_trial(ledger.stored(study, first.number)).params == {"cell": "a"}
    ledger.tell(study, first, "failed")
    ledger.enqueue(study, {"cell": "a"}, **{ledger.RETRY_OF: first.number})
    taken = []
    while (t := ledger.take_waiting(study)) is not None:
        r = ledger.read_trial(ledger.stored(study, t.number))
        taken.append((r.params["cell"], r.retry_of))
    assert taken == [("a", first.number), ("b", None), ("c", None)]
