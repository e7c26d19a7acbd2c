"""The one trial record (`TrialSummary`), the child-process protocol, and studies written by earlier
versions: they still open and report exactly as committed."""

import difflib
import json
import shutil
import signal
from pathlib import Path

import optuna
import pytest

from experiments.child import ChildProcess, Isolation, run_isolated
from experiments.errors import MeasureError
from experiments.report import write_report
from experiments.runs import SCOPE_STEPS, SCOPE_TRIAL, TrialSummary, curve_point
from experiments.study import Recipe, read_trials

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "recipes"


def test_summary_round_trips_and_the_study_form_is_compact():
    s = TrialSummary(status="completed", steps=4, final={"val_bpb": 2.5, "by": {"seq_len": {64: 0.5}}},
                     evals=[{"step": 4, "tokens": 64, "val_bpb": 2.5}], params=1000, peak_memory_mib=12.5,
                     memory_scope=SCOPE_STEPS, memory_split={"params": 4000}, model={"d_model": 32, "n_layers": 2},
                     dataset={"corpus": {"content_hash": "abc", "files": list(range(100))}},
                     machine={"cpu": "x", "torch": "2.13", "platform": "linux"}, measure={"memory": {"rows": []}})
    full = json.loads(json.dumps(s.to_json()))
    assert TrialSummary.from_json(full).to_json() == full
    stored = s.to_json(for_study=True)
    assert "dataset" not in stored and "measure" not in stored and set(stored["machine"]) == {
        "cpu", "torch", "cuda_device", "torch_threads"}
    back = TrialSummary.from_json(stored, measure=s.measure)
    assert back.value("val_bpb") == 2.5 and back.value("peak_memory_mib") == 12.5 and back.d_model == 32
    assert back.value("peak_memory_mb") == 12.5  # the old name of the metric
    assert back.final["by"]["seq_len"] == {"64": 0.5} and back.measure == s.measure
    assert back.value("accuracy") is None


def test_summaries_of_earlier_versions_read_with_their_meaning():
    old = {"status": "completed", "peak_memory_mb": 272.9, "memory_method": "VmHWM - baseline (clear_refs)",
           "dataset": {"corpus": {"content_hash": "212ab5172957"}, "unigram_bpb": 4.81}, "no_longer_a_field": 1}
    s = TrialSummary.from_json(old)
    assert s.peak_memory_mib == 272.9 and s.memory_scope == SCOPE_TRIAL  # measured over the whole trial
    assert s.corpus_hash == "212ab5172957" and s.unigram_bpb == 4.81


def test_a_final_evaluation_over_several_lengths_keeps_the_learning_curve_on_the_training_length():
    """The last evaluation of an extrapolation task measures 1x-4x; its curve point is the training length's
    accuracy, like every point before it, with the all-lengths figures beside it — and a summary written
    before that (its last point the all-lengths mean) reads the same way."""
    final = {"accuracy": 0.4, "exact_match": 0.25, "by": {"seq_len": {256: 0.9, 512: 0.2, 1024: 0.1}}}
    point = curve_point(3000, 10**6, final, seq_len=256)
    assert point == {"step": 3000, "tokens": 10**6, "accuracy": 0.9, "accuracy_all_lengths": 0.4,
                     "exact_match_all_lengths": 0.25}
    one_length = {"accuracy": 0.7, "exact_match": 0.5, "by": {"seq_len": {256: 0.7}}}
    assert curve_point(500, 10, one_length, seq_len=256) == {"step": 500, "tokens": 10, "accuracy": 0.7,
                                                             "exact_match": 0.5}
    old = {"status": "completed", "steps": 3000, "train": {"seq_len": 256},
           "final": json.loads(json.dumps(final)),  # as stored: the lengths are strings
           "evals": [{"step": 2500, "tokens": 8 * 10**5, "accuracy": 0.8, "exact_match": 0.75},
                     {"step": 3000, "tokens": 10**6, "accuracy": 0.4, "exact_match": 0.25}]}
    s = TrialSummary.from_json(old)
    assert [e["accuracy"] for e in s.evals] == [0.8, 0.9] and s.evals[-1]["accuracy_all_lengths"] == 0.4
    assert s.value("accuracy") == 0.4  # the trial's objective is still the mean over every length
    assert TrialSummary.from_json(s.to_json()).evals == s.evals
    stopped = {**old, "steps": 2700}  # an interrupted run: its last point is not the final evaluation
    assert TrialSummary.from_json(stopped).evals == old["evals"]


@pytest.mark.parametrize("db", sorted(COMMITTED.glob("*/study.sqlite")), ids=lambda p: p.parent.name)
def test_committed_studies_open_and_report_as_committed(db, tmp_path):
    """Studies written by earlier versions (committed beside their tables, with the recipe they ran with where
    the bundled one has changed since) read through `TrialRecord` and `mixerlab study report` writes table.md
    (and table_all.md) equal to the committed ones."""
    copy = tmp_path / "study.db"
    shutil.copy(db, copy)  # reading must not touch the committed file
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{copy}")
    records = read_trials(study)
    assert records and all(r.summary is not None for r in records if r.state == "complete")
    name, scale = db.parent.name.rsplit("-", 1)
    ran = db.parent / "recipe.toml"  # the recipe the study ran with, where the bundled one has changed since
    info = Recipe.load(str(ran) if ran.exists() else name, scale).to_dict()
    info["source"] = ""  # it ran as the bundled recipe of its day: the table's command names it so
    write_report(study, tmp_path / "out", recipe_info=info, figures=[])
    for table in ("table.md", "table_all.md"):
        if (db.parent / table).exists():
            want, got = (db.parent / table).read_text(), (tmp_path / "out" / table).read_text()
            assert got == want, "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), lineterm=""))


# the child-process protocol ---------------------------------------------------------------------------------
def echo(value, channel=None):
    """Run in a child: ask the parent once when there is a channel, return what was said."""
    answer = channel.ask("question", {"value": value}) if channel is not None else None
    return {"value": value, "answer": answer}


def fail(message):
    raise ValueError(message)


def sleep_forever():
    import time

    time.sleep(600)


def kill_self():
    import os

    os.kill(os.getpid(), signal.SIGKILL)


def test_run_isolated_returns_the_result_and_sets_threads():
    assert run_isolated(f"{__name__}:echo", {"value": 3}) == {"value": 3, "answer": None}
    assert run_isolated("torch:get_num_threads", {}, Isolation(threads=1)) == 1


def test_a_child_error_names_the_call_and_the_exception():
    with pytest.raises(MeasureError, match=r"fail\(\{'message': 'bad input'\}\) failed: ValueError: bad input"):
        run_isolated(f"{__name__}:fail", {"message": "bad input"})


def test_timeouts_and_kills_are_reported():
    with pytest.raises(MeasureError, match="timed out after 1 s"):
        run_isolated(f"{__name__}:sleep_forever", {}, Isolation(timeout=1))
    with pytest.raises(MeasureError, match=r"killed by SIGKILL \(out of memory\?\)"):
        run_isolated(f"{__name__}:kill_self", {})


def test_a_channel_carries_questions_and_answers():
    child = ChildProcess(f"{__name__}:echo", {"value": 7}, channel=True)
    try:
        seen = []
        for msg in child.messages():
            seen.append((msg.kind, msg.data))
            child.reply("yes")
    finally:
        child.close()
    assert seen == [("question", {"value": 7})] and child.result == {"value": 7, "answer": "yes"}
