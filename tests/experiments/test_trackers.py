"""train.log_to: TensorBoard event files, an MLflow file store and a W&B offline run hold the run's metrics
and the same final metrics as summary.json; a missing tracker is refused before anything is written."""

import json

import pytest

from experiments.config import build_specs
from experiments.errors import RunError
from experiments.train import train

CONFIG = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "mixer": "attention"},
          "train": {"steps": 6, "batch_size": 2, "seq_len": 16, "eval_interval": 3, "eval_batches": 1,
                    "log_interval": 2},
          "data": {"corpus": "stdlib"}}


def run_with(tmp_path, monkeypatch, *names, steps=6):
    config = json.loads(json.dumps(CONFIG))
    config["train"].update(log_to=list(names), steps=steps)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return train(*build_specs(config), tmp_path / "run", progress=False)


def test_tensorboard_and_mlflow_hold_the_runs_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_with(tmp_path, monkeypatch, "tensorboard", "mlflow")
    out = tmp_path / "run"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/val_bpb")] == [3, 6]
    assert events.Scalars("final/val_bpb")[0].value == pytest.approx(summary.final["val_bpb"], rel=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mixerlab").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.metrics["final.val_bpb"] == pytest.approx(summary.final["val_bpb"], rel=1e-9)
    assert run.data.params["model.mixer"] == "attention" and run.data.params["train.steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "eval.val_loss")
    assert [m.step for m in history] == [3, 6]


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    config = json.loads(json.dumps(CONFIG))
    config["train"]["log_to"] = ["mlflow"]
    train(*build_specs(config), tmp_path / "run", progress=False, stop_at=3)
    train(*build_specs(config), tmp_path / "run", progress=False)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mixerlab").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval.val_loss")] == [3, 6]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    summary = run_with(tmp_path, monkeypatch, "wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert ids["wandb"] in runs[0].name and summary.status == "completed"


def test_an_unknown_or_missing_tracker_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(RunError, match="unknown tracker 'tensorbord'"):
        run_with(tmp_path, monkeypatch, "tensorbord")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RunError, match=r"pip install 'mixerlab\[mlflow\]'"):
        run_with(tmp_path, monkeypatch, "mlflow")
    assert not (tmp_path / "run").exists()


def test_a_studys_trials_log_one_run_each_into_the_studys_store(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.study import Recipe, StudyRunner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = json.loads(json.dumps(CONFIG))
    base["train"]["log_to"] = ["mlflow", "tensorboard"]
    recipe = Recipe.from_dict({"name": "tracked", "base": base, "sampler": {"kind": "grid"},
                               "space": {"train.lr": [1e-3, 3e-3]}, "trial": {"threads": 1, "timeout_s": 120}},
                              scale="cpu")
    runner = StudyRunner(recipe, tmp_path / "study", jobs=2, progress=False)
    assert runner.run()["complete"] == 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(runner.study.study_name).experiment_id])
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert sorted(by_trial) == [0, 1]  # both trials, in the one store of the study, started at the same time
    for trial in runner.study.get_trials():
        run, summary = by_trial[trial.number], json.loads(
            (tmp_path / "study" / "trials" / f"{trial.number:04d}" / "summary.json").read_text())
        assert run.info.run_name == f"trial-{trial.number:04d}" and run.info.status == "FINISHED"
        assert float(run.data.params["optuna.train.lr"]) == trial.params["train.lr"]
        assert run.data.metrics["final.val_bpb"] == pytest.approx(summary["final"]["val_bpb"], rel=1e-9)
        assert trial.value == pytest.approx(run.data.metrics["final.val_bpb"], rel=1e-9)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval.val_loss")] == [3, 6]
        hparams = EventAccumulator(str(tmp_path / "study" / "trials" / f"{trial.number:04d}" / "tensorboard" /
                                       "hparams"))
        hparams.Reload()
        assert hparams.Scalars("final/val_bpb")[0].value == pytest.approx(summary["final"]["val_bpb"], rel=1e-6)
    assert not list((tmp_path / "study" / "trials").glob("*/mlflow.db"))  # no store per trial
