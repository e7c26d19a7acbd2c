import pytest

from experiments.cli import main
from experiments.config import ConfigError, apply_overrides, build_specs, load_toml, parse_value


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("mamba") == "mamba" and parse_value('"x y"') == "x y"
    assert parse_value('{"mamba2": {"d_state": 64}}') == {"mamba2": {"d_state": 64}}  # JSON, as typed in a shell
    assert parse_value("{mamba2 = {d_state = 64}}") == {"mamba2": {"d_state": 64}}
    assert parse_value("[ab]*.txt") == "[ab]*.txt"  # neither TOML nor JSON: a glob stays a string


def test_overrides_and_specs(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "transformer"\nd_model = 32\n[train]\nsteps = 5\n[data]\ntask = "mqar"\n')
    config = apply_overrides(load_toml(path), ["model.n_layers=3", "train.lr=1e-3", "data.options.num_kv_pairs=2"])
    model, train, data = build_specs(config)
    assert (model.d_model, model.n_layers, model.positions) == (32, 3, "rope")
    assert train.steps == 5 and train.lr == 1e-3 and data.task == "mqar" and data.options == {"num_kv_pairs": 2}


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["model.d_model"])
    with pytest.raises(ConfigError, match="must start with one of model, train, data"):
        apply_overrides({}, ["modle.d_model=3"])
    with pytest.raises(ConfigError, match="no field 'd_modl'.*d_model"):
        build_specs({"model": {"d_modl": 3}})
    with pytest.raises(ConfigError, match="unknown config section"):
        build_specs({"optimizer": {}})


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--mixer", "attention", "--steps", "3", "--out", str(out), "--no-progress",
                 "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "train.batch_size=2",
                 "train.seq_len=16", "train.eval_batches=1", "train.warmup_steps=1"])
    text = capsys.readouterr().out
    assert code == 0 and (out / "summary.json").exists()
    assert "val bits per byte" in text and "unigram baseline" in text


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "--mixer", "atention", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'attention'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_generate_continues_a_prompt(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--pattern", "MA", "--steps", "2", "--out", str(out), "--no-progress", "model.d_model=16",
                 "model.n_layers=2", "model.n_heads=2", "train.batch_size=2", "train.seq_len=16",
                 "train.eval_batches=1", "train.warmup_steps=1", "train.eval_interval=2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "import ", "--tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("import ") and len(text.rstrip("\n")) > len("import ")


def test_cli_train_reports_lengths_a_learned_model_cannot_run(tmp_path, capsys):
    code = main(["train", "--task", "induction", "--mixer", "attention", "--steps", "2", "--out", str(tmp_path / "r"),
                 "--no-progress", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.positions=learned",
                 "model.max_seq_len=16", "train.batch_size=2", "train.seq_len=16", "train.eval_examples=2",
                 "train.warmup_steps=1", "train.eval_interval=2", "data.options.test_multipliers=[1, 2]"])
    text = capsys.readouterr().out
    assert code == 0 and "32: n/a" in text and "learned positions" in text


def test_ctrl_c_during_train_checkpoints_the_step_and_the_rerun_resumes_there(tmp_path):
    """SIGINT at step 40 of 120 (checkpoints every 100): the run saves step 40 and exits 130; the same command
    resumes at step 40 and ends where an uninterrupted run ends, to the last bit of the loss. (The model is
    big enough that steps 40 to 100 take most of a second, so the signal lands before the run ends.)"""
    import json
    import signal
    import subprocess
    import sys
    import time

    def cmd(out):
        return [sys.executable, "-m", "experiments", "train", "--mixer", "attention", "--steps", "120", "--out",
                str(out), "--no-progress", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
                "train.batch_size=4", "train.seq_len=64", "train.eval_batches=1", "train.warmup_steps=1",
                "train.log_interval=1", "train.eval_interval=100", "--threads", "1"]

    def steps(out):  # read while the run appends: a last line not yet ended with its newline is left out
        path = out / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().split("\n")[:-1]] if path.exists() else []

    straight = tmp_path / "straight"
    subprocess.run(cmd(straight), check=True, capture_output=True, timeout=300)
    out = tmp_path / "run"
    # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored: give
    # the run the default disposition, as a terminal would, however the test suite itself was started
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["step"] >= 40 for e in steps(out)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err, err
    import torch

    saved = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 40 <= saved < 100 and saved == max(e["step"] for e in steps(out))  # the step it was on
    again = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    loss = {e["step"]: e["loss"] for e in steps(out) if e["event"] == "train"}
    want = {e["step"]: e["loss"] for e in steps(straight) if e["event"] == "train"}
    assert loss == want and sorted(loss) == list(range(1, 121))
    final = [e for e in steps(out) if e["event"] == "eval"][-1]
    assert final == [e for e in steps(straight) if e["event"] == "eval"][-1]
    # a finished run rerun: reported, nothing changed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    third = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "nothing was changed" in third.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_minimal_plugin_shows_its_backend_and_name_not_holes(tmp_path, capsys):
    """The documented minimal plugin (``__init__`` and ``forward`` only) never records a backend and has no
    legend letter: the summary says ``torch`` and ``2 × toymix``, not ``None`` and ``??``."""
    out = tmp_path / "run"
    assert main(["train", "--mixer", "toymix", "--steps", "2", "--out", str(out), "--no-progress",
                 "model.d_model=16", "model.n_layers=2", "train.batch_size=2", "train.seq_len=16",
                 "train.eval_batches=1", "train.warmup_steps=1"]) == 0
    text = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in text.splitlines()[2:] if line.split(None, 1)[0] in ("layers",
                                                                                                  "backends"))
    assert rows["layers"].strip() == "2 × toymix" and rows["backends"].strip() == "torch"
    import json

    assert set(json.loads((out / "summary.json").read_text())["backends"].values()) == {"torch"}


def test_bad_values_are_refused_before_anything_is_written_and_the_fix_then_runs(tmp_path, capsys):
    """The issue's cases: each one line naming the field; the directory is left unwritten, so the corrected
    command runs on the same --out."""
    out = tmp_path / "run"
    base = ["train", "--mixer", "attention", "--steps", "1", "--out", str(out), "--no-progress",
            "model.n_layers=1", "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1"]
    cases = {"model.n_heads=3": "n_heads=3", "train.beta1=2": "TrainSpec.beta1", "train.beta1=abc": "beta1",
             "train.seed=abc": "TrainSpec.seed", "train.lr=abc": "TrainSpec.lr",
             "train.warmup_steps=x": "warmup_steps"}
    for override, named in cases.items():
        assert main([*base, override]) == 2, override
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists(), override
    assert main(base) == 0


def test_generate_refuses_what_it_cannot_do_before_generating(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--no-progress", "model.d_model=16", "model.n_layers=1",
                 "model.n_heads=2", "model.positions=learned", "model.max_seq_len=32", "train.batch_size=2",
                 "train.seq_len=16", "train.eval_batches=1"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def ", "--tokens", "200"]) == 2
    captured = capsys.readouterr()
    assert "use --tokens 28 or fewer" in captured.err and captured.out == ""  # nothing generated, one line
    assert main(["generate", str(tmp_path / "nope")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "", "--tokens", "5"]) == 0  # an empty prompt starts at <bos>
