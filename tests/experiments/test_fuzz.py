"""The whole input surface, fuzzed with hypothesis: every field of ModelSpec, TrainSpec and DataSpec, every
task's and corpus's options, `generate`, `measure` and recipe sections, given wrong types, out-of-range
numbers, text, empty values, unknown keys and huge sizes. For each: either the command is accepted and does
its work (a 1-step train, a generation, a measurement), or it exits 2 with one line naming the offending
field — no traceback — and writes nothing. A huge value that validation accepts (a long but possible run)
is checked with ``mixerlab train --check`` rather than trained.

Examples are drawn from a fixed seed (``derandomize``) so CI sees the same ones every run; raise
``MIXERLAB_FUZZ_EXAMPLES`` to search further locally.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from archs.model import ModelSpec
from experiments.cli import main
from experiments.config import DataSpec, TrainSpec
from experiments.data.corpus import StdlibOptions
from experiments.tasks import TASKS

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("MIXERLAB_FUZZ_EXAMPLES", "0"))
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.mlp=none", "train.batch_size=2",
        "train.seq_len=16", "train.eval_batches=1", "train.warmup_steps=1", "train.eval_interval=1",
        "train.eval_examples=2"]
#: budgets a user may set as large as they like (valid, only long): never drawn huge here
BUDGETS = {"steps", "tokens", "eval_interval", "log_interval", "warmup_steps"}


def fuzz_settings(n: int):
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=list(HealthCheck))


def literal(value) -> str:
    """A value as typed after ``key=`` on the command line (TOML literal; text as it is)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    return json.dumps(value)


HUGE = (10**7, 10**9, 10**12, 10**30, 1e300, 2**63)


def values(huge: bool = True):
    small = st.one_of(st.integers(-3, 64), st.floats(-2, 2, allow_nan=False, allow_subnormal=False), st.booleans())
    wrong = st.sampled_from(["abc", "", '""', "3e-3x", "[1, 2]", "{a = 1}", "[", "none", "-", "1e-3", "0x10"])
    odd = st.sampled_from([math.nan, math.inf, -math.inf, -(10**9), 0, -1, 0.5, 1.5])
    return st.one_of(small, wrong, odd, *([st.sampled_from(HUGE)] if huge else []))


def train_or_check(argv, value, out, capsys):
    """``mixerlab train`` with ``argv``: validated only (``--check``) for a huge value, else trained."""
    huge = not isinstance(value, (str, bool)) and isinstance(value, (int, float)) and abs(value) >= 10**7
    code, stdout, err = run_cli(["train", *argv, *(["--check"] if huge else [])], capsys)
    if huge and code == 0:
        assert "valid:" in stdout and not out.exists()
        event("accepted: checked")
    return code, err, huge


def fields(cls, skip=()):
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def names_field(message: str, field: str) -> bool:
    return re.search(rf"\b{re.escape(field)}\b", message) is not None


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors exit 2 with a usage line
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def check_refused(code, err, field, out_dir):
    event("refused")
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.strip(), err
    assert names_field(err, field), f"the error does not name {field!r}: {err}"
    assert not out_dir.exists(), f"{out_dir} was written before the error"


# train: every field of every spec --------------------------------------------------------------------------
TRAIN_KEYS = ([f"model.{f}" for f in fields(ModelSpec)] + [f"train.{f}" for f in fields(TrainSpec, ("compile",))]
              + [f"data.{f}" for f in fields(DataSpec)] + [f"data.options.{f}" for f in fields(StdlibOptions)]
              + ["model.unknown_field", "train.unknown_field", "data.options.unknown_option"])
TASK_KEYS = [(task, f"data.options.{f.name}") for task, cls in TASKS.items() for f in dataclasses.fields(cls.Config)]


@fuzz_settings(60)
@given(key=st.sampled_from(TRAIN_KEYS), data=st.data())
def test_train_accepts_or_names_the_field(key, data, tmp_path_factory, capsys):
    value = data.draw(values(huge=key.rsplit(".", 1)[1] not in BUDGETS), label="value")
    out = tmp_path_factory.mktemp("fuzz") / "run"
    extra = ["data.options.path=experiments"] if key == "data.corpus" and value == "textfile" else []
    code, err, huge = train_or_check(["--steps", "1", "--out", str(out), "--no-progress", *TINY, *extra,
                                      f"{key}={literal(value)}"], value, out, capsys)
    if code == 2:
        check_refused(code, err, key.rsplit(".", 1)[1], out)
    elif not huge:
        summary = json.loads((out / "summary.json").read_text())
        event(f"accepted: {summary['status']}")
        assert code in (0, 1) and summary["status"] in ("completed", "diverged"), (code, err)
    shutil.rmtree(out.parent, ignore_errors=True)


TASK_BASE = [*TINY, "train.seq_len=128"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_unmutated_task_run_is_accepted(task, tmp_path, capsys):
    """The base every task example mutates is valid, so a refusal is the mutation's."""
    code, _, err = run_cli(["train", "--task", task, "--steps", "1", "--out", str(tmp_path / "r"), "--no-progress",
                            *TASK_BASE], capsys)
    assert code == 0, err


@fuzz_settings(40)
@given(task_key=st.sampled_from(TASK_KEYS), data=st.data())
def test_task_options_accept_or_name_the_field(task_key, data, tmp_path_factory, capsys):
    task, key = task_key
    value = data.draw(values(), label="value")
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code, err, huge = train_or_check(["--task", task, "--steps", "1", "--out", str(out), "--no-progress",
                                      *TASK_BASE, f"{key}={literal(value)}"], value, out, capsys)
    if code == 2:
        check_refused(code, err, key.rsplit(".", 1)[1], out)
    elif not huge:
        status = json.loads((out / "summary.json").read_text())["status"]
        event(f"accepted: {status}")
        assert code in (0, 1) and status in ("completed", "diverged"), err
    shutil.rmtree(out.parent, ignore_errors=True)


# generate ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", "--steps", "1", "--out", str(out), "--no-progress", *TINY, "model.positions=learned",
                 "model.max_seq_len=32"]) == 0
    return out


GENERATE_FLAGS = ["--tokens", "--temperature", "--top-k", "--seed", "--prompt"]


@fuzz_settings(40)
@given(flag=st.sampled_from(GENERATE_FLAGS), data=st.data())
def test_generate_accepts_or_names_the_flag(flag, data, text_run, capsys):
    value = literal(data.draw(values(), label="value"))
    before = sorted(p.name for p in text_run.iterdir())
    code, out, err = run_cli(["generate", str(text_run), "--tokens", "8", flag, value], capsys)
    if code == 0:
        event("accepted")
        prompt = value if flag == "--prompt" else "def "
        assert out.startswith(prompt[:4]) or flag == "--prompt", out
    else:
        event("refused")
        assert code == 2 and "Traceback" not in err and flag.lstrip("-") in err.replace("_", "-"), err
    assert sorted(p.name for p in text_run.iterdir()) == before


# measure ------------------------------------------------------------------------------------------------------
MEASURE_FLAGS = ["--lengths", "--d-model", "--batch", "--mode", "--device", "--dtype", "--timeout", "--repeats",
                 "--threads", "--budget-gb", "--option", "--set"]


@fuzz_settings(40)
@given(flag=st.sampled_from(MEASURE_FLAGS), data=st.data())
def test_measure_accepts_or_names_the_flag(flag, data, tmp_path_factory, capsys):
    value = literal(data.draw(values(), label="value"))
    if flag in ("--option", "--set"):
        key = data.draw(st.sampled_from(["impl", "n_heads", "head_dim", "window", "bias", "nope"] if flag == "--option"
                                        else ["n_layers", "d_model", "positions", "mlp", "nope"]), label="key")
        value = f"{key}={value}"
    out = tmp_path_factory.mktemp("measure") / "out"
    target = ["--preset", "transformer", "--set", "n_layers=1", "--d-model", "16"] if flag == "--set" else [
        "--mixer", "attention", "--d-model", "16"]
    base = ["measure", "memory", *target, "--lengths", "16", "--repeats", "1", "--threads", "1", "--out", str(out)]
    code, stdout, err = run_cli([*base, flag, value, "--check"], capsys)
    if code != 0:
        event("refused")
        named = flag.lstrip("-") in err or (flag in ("--option", "--set") and value.split("=")[0] in err)
        assert code == 2 and "Traceback" not in err and named, err
    else:
        event("accepted")
        assert "valid:" in stdout
    assert not out.exists()


# study recipes ----------------------------------------------------------------------------------------------
RECIPE_KEYS = [("objectives",), ("sampler", "kind"), ("sampler", "seed"), ("pruner", "kind"),
               ("pruner", "n_warmup_steps"), ("budget", "trials"), ("budget", "timeout_s"), ("trial", "jobs"),
               ("trial", "threads"), ("trial", "timeout_s"), ("constraints", "peak_memory_mib"),
               ("space", "model.d_model"), ("space", "train.lr"), ("base", "train", "lr"), ("base", "train", "steps"),
               ("base", "model", "d_model"), ("base", "model", "mixer"), ("base", "data", "corpus"),
               ("measure", "memory", "lengths"), ("measure", "decode", "contexts"), ("report", "best_over"),
               ("variants", "a", "model.mixer"), ("unknown_section",)]
RECIPE = {"name": "fuzz", "sampler": {"kind": "grid"},
          "base": {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "mlp": "none"},
                   "train": {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_batches": 1}}}


def to_toml(doc: dict, prefix: str = "") -> str:
    """A small TOML writer for the recipes here (scalars and lists of scalars under nested tables)."""
    lines = [f"{json.dumps(k)} = {literal(v) if not isinstance(v, str) else json.dumps(v)}" for k, v in doc.items()
             if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
            lines += [f"[{name}]", to_toml(v, name)]
    return "\n".join(lines) + "\n"


@fuzz_settings(60)
@given(key=st.sampled_from(RECIPE_KEYS), data=st.data())
def test_a_recipe_section_is_accepted_or_named(key, data, tmp_path_factory, capsys):
    value = data.draw(values(), label="value")
    recipe = json.loads(json.dumps(RECIPE))
    node = recipe
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    root = tmp_path_factory.mktemp("recipe")
    (root / "fuzz.toml").write_text(to_toml(recipe))
    out = root / "out"
    code, stdout, err = run_cli(["study", "run", str(root / "fuzz.toml"), "--out", str(out), "--check"], capsys)
    if code != 0:
        event("refused")
        named = any(part.rsplit(".", 1)[-1] in err for part in key)
        assert code == 2 and "Traceback" not in err and named, (to_toml(recipe), err)
    else:
        event("accepted")
        assert "valid:" in stdout
    assert not out.exists()
