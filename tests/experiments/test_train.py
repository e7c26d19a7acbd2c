import json
import math

import pytest
import torch

from archs.model import LanguageModel, ModelSpec
from experiments.child import run_isolated
from experiments.runs import TrialSummary
from experiments.train import DataSpec, Pruned, RunError, StopTraining, TrainSpec, _param_groups, train

MODEL = ModelSpec(d_model=16, n_layers=1, n_heads=2, mlp="none", positions="rope")
TRAIN = TrainSpec(steps=8, batch_size=2, seq_len=16, eval_interval=4, eval_batches=1, warmup_steps=2,
                  log_interval=1)


def losses(out) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["event"] == "train"]


def test_same_seed_same_curve_and_summary(tmp_path):
    a = train(MODEL, TRAIN, DataSpec(), tmp_path / "a", progress=False)
    b = train(MODEL, TRAIN, DataSpec(), tmp_path / "b", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert a.final == b.final and a.status == "completed" and a.steps == 8
    train(MODEL, TrainSpec(**{**TRAIN.to_dict(), "seed": 1}), DataSpec(), tmp_path / "c", progress=False)
    assert losses(tmp_path / "c") != losses(tmp_path / "a")
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ("model", "train", "data", "final", "backends", "machine", "dataset", "wall_seconds"):
        assert s[key] is not None, key
    assert s["dataset"]["corpus"]["content_hash"] and s["final"]["val_bpb"] > 0
    assert s["final"]["val_ppl"] == pytest.approx(math.exp(s["final"]["val_loss"]))
    assert TrialSummary.from_json(s) == a  # summary.json is the summary train returned


def test_resume_gives_the_same_result(tmp_path):
    straight = train(MODEL, TRAIN, DataSpec(), tmp_path / "straight", progress=False)
    stopped = train(MODEL, TRAIN, DataSpec(), tmp_path / "resumed", progress=False, stop_at=5)
    assert stopped.status == "stopped" and stopped.steps == 5
    resumed = train(MODEL, TRAIN, DataSpec(), tmp_path / "resumed", progress=False)
    assert resumed.status == "completed"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert resumed.final == straight.final
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_accepts_specs_written_before_a_field_existed(tmp_path):
    """A run directory from an older version (its spec.json lacks a field added since, at its default)
    resumes; one whose recorded value differs is still refused."""
    train(MODEL, TRAIN, DataSpec(), tmp_path, progress=False, stop_at=4)
    spec = json.loads((tmp_path / "spec.json").read_text())
    del spec["train"]["target_accuracy"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert train(MODEL, TRAIN, DataSpec(), tmp_path, progress=False).steps == 8
    spec["train"]["lr"] = 1.0
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(RunError, match="different train specs"):
        train(MODEL, TRAIN, DataSpec(), tmp_path, progress=False)


def test_a_directory_of_another_run_is_refused(tmp_path):
    train(MODEL, TRAIN, DataSpec(), tmp_path, progress=False, stop_at=2)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="different model specs"):
        train(MODEL.replace(d_model=24), TRAIN, DataSpec(), tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing lost


def test_divergence_is_a_status_not_a_traceback(tmp_path):
    spec = TrainSpec(**{**TRAIN.to_dict(), "lr": 1e12, "grad_clip": 0.0, "warmup_steps": 0})
    s = train(MODEL, spec, DataSpec(), tmp_path, progress=False)
    assert s.status == "diverged" and s.steps < 8
    assert any(json.loads(x)["event"] == "diverged" for x in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_eval_callback_can_prune(tmp_path):
    seen = []

    def on_eval(step, metrics):
        seen.append((step, metrics["val_bpb"]))
        raise Pruned()

    s = train(MODEL, TRAIN, DataSpec(), tmp_path, progress=False, on_eval=on_eval)
    assert s.status == "pruned" and s.steps == 4 and seen[0][0] == 4


def test_task_training_reports_accuracy(tmp_path):
    spec = TrainSpec(steps=2, batch_size=4, seq_len=32, eval_interval=2, eval_examples=4, warmup_steps=1)
    s = train(MODEL, spec, DataSpec(task="mqar", options={"vocab_size": 64, "num_kv_pairs": 2}), tmp_path,
              progress=False)
    assert 0.0 <= s.final["accuracy"] <= 1.0 and "by" in s.final
    assert s.model["vocab_size"] == 64  # taken from the task


def test_validation_happens_before_work(tmp_path):
    with pytest.raises(RunError, match="exceed the model's learned positions"):
        train(MODEL.replace(positions="learned", max_seq_len=8), TRAIN, DataSpec(), tmp_path, progress=False)
    with pytest.raises(RunError, match="TrainSpec.precision"):
        TrainSpec(precision="fp8")
    with pytest.raises(RunError, match="no field 'step'.*steps"):
        TrainSpec.from_dict({"step": 3})
    with pytest.raises(RunError, match="corpus or a task, not both"):
        DataSpec(corpus="textfile", task="mqar")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_schedule_and_token_budget():
    spec = TrainSpec(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert spec.lr_at(0) == pytest.approx(0.1) and spec.lr_at(9) == pytest.approx(1.0)
    assert spec.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert TrainSpec(tokens=1000, batch_size=2, seq_len=100).total_steps == 5


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    model = LanguageModel(ModelSpec(d_model=16, n_layers=2, pattern="MA", n_heads=2, bias=True, norm="layernorm"))
    decay, no_decay = _param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.mixer.A_log" in no and "blocks.0.mixer.D" in no and "blocks.0.norm1.weight" in no
    assert "blocks.0.mixer.in_proj.weight" in yes and "blocks.1.mixer.wqkv.weight" in yes
    assert not any(n.endswith(".bias") for n in yes)


def test_task_lengths_beyond_learned_positions_are_not_applicable(tmp_path):
    spec = TrainSpec(steps=2, batch_size=4, seq_len=16, eval_interval=2, eval_examples=2, warmup_steps=1)
    model = MODEL.replace(positions="learned", max_seq_len=16)
    s = train(model, spec, DataSpec(task="induction", options={"test_multipliers": [1, 2, 4]}), tmp_path,
              progress=False)
    by = s.final["by"]["seq_len"]
    assert by[16] is not None and by[32] is None and by[64] is None
    assert "learned positions" in s.final["not_applicable"]


def test_target_accuracy_ends_a_task_run_once_reached(tmp_path, monkeypatch):
    from experiments.data.training import TaskData

    calls = []

    def scripted(self, model, device, final=True):  # accuracy 0.2, 0.6, 0.95, ... at the evals
        calls.append(final)
        return {"accuracy": 1.0 if final else [0.2, 0.6, 0.95, 0.99][min(len(calls), 4) - 1], "by": {}}

    monkeypatch.setattr(TaskData, "evaluate", scripted)
    spec = TrainSpec(steps=40, batch_size=2, seq_len=16, eval_interval=5, warmup_steps=1, target_accuracy=0.9)
    data = DataSpec(task="mqar", options={"vocab_size": 32, "num_kv_pairs": 2})
    s = train(MODEL, spec, data, tmp_path, progress=False)
    assert s.status == "completed" and s.steps == 15 and s.target_reached_step == 15
    assert calls == [False, False, False, True]  # the run ends with a full (final) evaluation
    assert s.final["accuracy"] == 1.0 and s.evals[-1]["target_reached"]
    again = train(MODEL, spec, data, tmp_path, progress=False)  # rerun: resumes, nothing more to train
    assert again.steps == 15 and again.target_reached_step == 15 and len(calls) == 4
    no_target = train(MODEL, TrainSpec(**{**spec.to_dict(), "target_accuracy": None}), data, tmp_path / "b",
                      progress=False)
    assert no_target.steps == 40 and no_target.target_reached_step is None


def test_the_last_evaluation_over_several_lengths_is_read_at_the_training_length(tmp_path, monkeypatch):
    """An extrapolation task's final evaluation measures every test length: the target (and the learning
    curve) read its training-length accuracy, as at every evaluation before; the trial's accuracy is the
    mean over the lengths."""
    from experiments.data.training import TaskData

    def scripted(self, model, device, final=True):  # 0.5 at the training length until the last evaluation
        if not final:
            return {"accuracy": 0.5, "exact_match": 0.0, "by": {"seq_len": {16: 0.5}}}
        return {"accuracy": 0.55, "exact_match": 0.0, "by": {"seq_len": {16: 0.95, 32: 0.15}}}

    monkeypatch.setattr(TaskData, "evaluate", scripted)
    spec = TrainSpec(steps=8, batch_size=2, seq_len=16, eval_interval=4, warmup_steps=1, target_accuracy=0.9)
    s = train(MODEL, spec, DataSpec(task="induction", options={"test_multipliers": [1, 2]}), tmp_path,
              progress=False)
    assert [e["accuracy"] for e in s.evals] == [0.5, 0.95] and s.evals[-1]["accuracy_all_lengths"] == 0.55
    assert s.target_reached_step == 8 and s.final["accuracy"] == 0.55


def test_target_accuracy_needs_a_task(tmp_path):
    with pytest.raises(RunError, match="target_accuracy"):
        TrainSpec(target_accuracy=1.5)
    with pytest.raises(RunError, match="target_accuracy=0.9 needs a task"):
        train(MODEL, TrainSpec(**{**TRAIN.to_dict(), "target_accuracy": 0.9}), DataSpec(), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_an_interrupted_run_is_recorded_as_interrupted_and_resumes_exactly(tmp_path):
    """Stopped at an evaluation (Ctrl-C, SIGTERM, a lost coordinator): status "interrupted", not "pruned";
    the checkpoint of that evaluation lets the rerun finish on the uninterrupted curve."""
    straight = train(MODEL, TRAIN, DataSpec(), tmp_path / "straight", progress=False)

    def stop(step, metrics):
        raise StopTraining("coordinator gone")

    s = train(MODEL, TRAIN, DataSpec(), tmp_path / "run", progress=False, on_eval=stop)
    assert s.status == "interrupted" and s.steps == 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    resumed = train(MODEL, TRAIN, DataSpec(), tmp_path / "run", progress=False)
    assert resumed.status == "completed" and resumed.final == straight.final
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def train_in_child(out: str) -> dict:
    """A model large enough that its tensors are mappings of their own (a 16-wide one may fit in the heap
    the warm-up left, and read 0)."""
    spec = TrainSpec(**{**TRAIN.to_dict(), "batch_size": 4, "seq_len": 128})
    return train(MODEL.replace(d_model=64, n_heads=4), spec, DataSpec(), out, progress=False).to_json()


def test_the_run_records_its_training_memory(tmp_path):
    """In a fresh process (as trials run; in this one the allocator holds the earlier tests' memory)."""
    s = TrialSummary.from_json(run_isolated(f"{__name__}:train_in_child", {"out": str(tmp_path)}))
    split = s.memory_split
    assert s.memory_scope == "training steps" and s.peak_memory_mib > 0
    assert split["params"] == split["grads"] == 4 * s.params and split["optimizer"] >= 2 * split["params"]
    assert split["activations_saved"] > 0
