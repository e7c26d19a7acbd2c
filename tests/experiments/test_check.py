"""`mixerlab check`: the contract through the command (every registered mixer passes; broken plugins fail
exactly their check, saying where), bad input refused before anything is written, and a full check of the
installed test plugin writing its report card, figures and resumable parts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.cli import main
from registry import MIXERS

CONTRACT_TESTS = Path(__file__).parents[1] / "archs"  # test_contract_checks.py: a correct mixer, five broken


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """The mixers of ``tests/archs/test_contract_checks.py`` (a correct one, five broken ones) importable as
    ``test_contract_checks:Class``, as a plugin's module would be; the current directory an empty one."""
    monkeypatch.syspath_prepend(str(CONTRACT_TESTS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def lines(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("PASS", "FAIL"))]


@pytest.mark.parametrize("name", MIXERS.names())
def test_every_registered_mixer_passes_contract_only(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["check", name, "--contract-only", "--d-model", "32"]) == 0
    verdicts = lines(capsys.readouterr().out)
    assert len(verdicts) == 9 and all(v.startswith("PASS") for v in verdicts), verdicts
    assert list(tmp_path.iterdir()) == []  # --contract-only without --out writes nothing


@pytest.mark.parametrize("cls, fails, where", [
    ("ReadsTheNextToken", {"causality", "decoding"}, r"changed the output at position \d+"),
    ("MixesBatchRows", {"batch_independence"}, r"sequence 0 changed by .* \(first at position 0\)"),
    ("NaNInBF16", {"finite_bf16"}, r"first non-finite output at \(batch, position, channel\) = \(0, 0, 0\)"),
    ("StepDrifts", {"decoding"}, r"prefill 1: position 7 differs from the forward by"),
    ("LiesAboutItsState", {"state_bytes"}, r"state_bytes says 64, the cache holds \d+"),
])
def test_a_broken_plugin_fails_exactly_its_check(broken, capsys, cls, fails, where):
    assert main(["check", f"test_contract_checks:{cls}", "--contract-only", "--d-model", "16"]) == 1
    out = capsys.readouterr().out
    failed = {v.split()[1] for v in lines(out) if v.startswith("FAIL")}
    assert failed == fails, out
    assert re.search(where, out), out
    assert f"contract: {len(fails)} of 9 checks FAIL" in out


def test_a_correct_plugin_passes_and_the_card_says_so(broken, capsys):
    assert main(["check", "test_contract_checks:RunningMean", "--contract-only", "--out", "card"]) == 0
    card = json.loads((broken / "card" / "check.json").read_text())
    assert card["status"] == "complete" and len(card["contract"]) == 9
    assert all(c["passed"] for c in card["contract"]) and card["costs"] is None
    md = (broken / "card" / "check.md").read_text()
    assert "all 9 checks pass" in md and "`--contract-only`" in md


def test_a_failed_contract_writes_its_card_and_runs_nothing_else(broken, capsys):
    assert main(["check", "test_contract_checks:ReadsTheNextToken", "--out", "card", "--d-model", "16"]) == 1
    out = capsys.readouterr().out
    assert "costs and the quality probe were not run" in out
    card = json.loads((broken / "card" / "check.json").read_text())
    assert card["status"] == "contract failed: causality, decoding" and card["costs"] is None
    assert "**FAIL**" in (broken / "card" / "check.md").read_text()
    assert not (broken / "card" / "parts").exists()


@pytest.mark.parametrize("argv, says", [
    (["no_such_mixer"], "no_such_mixer"),
    (["mamba", "d_stat=16"], "d_stat"),
    (["mamba", "d_state"], "expected KEY=VALUE"),
    (["mamba", "--lengths", "512,abc"], "--lengths"),
    (["mamba", "--lengths", "0"], "'0' is not a positive integer"),
    (["mamba", "--modes", "backward"], "--modes"),
    (["mamba", "--tasks", "passkey"], "the probe's tasks are mqar, induction"),
    (["mamba", "--probe-lr", "0"], "--probe-lr"),
    (["mamba", "--d-model", "0"], "--d-model"),
    (["test_contract_checks:NoSuchClass"], "NoSuchClass"),
])
def test_bad_input_is_refused_before_anything_is_written(broken, capsys, argv, says):
    assert main(["check", *argv, "--out", "card"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert not (broken / "card").exists()


def test_an_out_that_holds_something_else_is_refused_and_kept(broken, capsys):
    (broken / "a_file").write_text("x")
    assert main(["check", "test_contract_checks:RunningMean", "--contract-only", "--out", "a_file"]) == 2
    assert "is a file" in capsys.readouterr().err and (broken / "a_file").read_text() == "x"
    (broken / "other").mkdir()
    (broken / "other" / "notes.txt").write_text("mine")
    assert main(["check", "test_contract_checks:RunningMean", "--contract-only", "--out", "other"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert main(["check", "test_contract_checks:RunningMean", "--contract-only", "--out", "card"]) == 0
    before = (broken / "card" / "check.json").read_text()
    assert main(["check", "mamba", "--contract-only", "--out", "card"]) == 2
    err = capsys.readouterr().err
    assert "holds a check of test_contract_checks:RunningMean" in err and "give another --out" in err
    assert (broken / "card" / "check.json").read_text() == before


QUICK = ["--d-model", "32", "--lengths", "32,64", "--modes", "fwd", "--contexts", "8,16", "--decode-steps", "2",
         "--repeats", "1", "--probe-steps", "4", "--probe-batch", "4"]


@pytest.mark.slow
def test_a_full_check_of_the_installed_plugin_writes_its_card(tmp_path, monkeypatch, capsys):
    """The toy plugin (installed as a distribution by conftest, found through its entry point): contract,
    costs beside attention and mamba, the probe; the card, its figures; a rerun reuses every finished part,
    and a part lost to an interruption is redone alone."""
    monkeypatch.chdir(tmp_path)
    assert main(["check", "toymix", *QUICK, "--out", "card"]) == 0
    out = capsys.readouterr()
    card_dir = tmp_path / "card"
    card = json.loads((card_dir / "check.json").read_text())
    assert card["status"] == "complete" and card["subjects"] == ["toymix", "attention", "mamba"]
    for label in card["subjects"]:
        rows = card["costs"]["scaling"][label]["fwd"]["rows"]
        assert [r["seq_len"] for r in rows] == [32, 64] and all(r["status"] == "ok" for r in rows)
        assert all(r["time_s"] > 0 for r in rows)
        dec = card["costs"]["decode"][label]["rows"]
        assert [r["context"] for r in dec] == [8, 16] and all(r["cache_bytes"] == r["state_bytes"] for r in dec)
        for task in ("mqar", "induction"):
            probe = card["probe"][task][label]
            assert probe["status"] == "completed" and probe["steps"] == 4 and len(probe["curve"]) == 4
            assert 0 <= probe["accuracy"] <= 1
    md = (card_dir / "check.md").read_text()
    for heading in ("## Contract", "### Time and memory vs T", "### Decoding", "## Quality probe"):
        assert heading in md
    assert md.count("| `attention` |") == 4 and md.count("| `mamba` |") == 4  # time, decode, two probe rows
    for fig in ("costs", "decode", "probe"):
        assert (card_dir / f"{fig}.png").stat().st_size > 10_000 and (card_dir / f"{fig}.svg").is_file()
    assert "quality probe (test accuracy):" in out.out and "report card:" in out.out

    (card_dir / "parts" / "probe-mqar-attention.json").unlink()
    assert main(["check", "toymix", *QUICK, "--out", "card"]) == 0
    err = capsys.readouterr().err
    assert err.count("reused from an earlier run") == 2 * 3 + 2 * 3 + 5  # 2 lengths, 2 contexts x 3; probe 6 - 1
    assert "mqar, attention: completed" in err
    again = json.loads((card_dir / "check.json").read_text())
    assert again["costs"] == card["costs"] and again["probe"]["induction"] == card["probe"]["induction"]

    assert main(["check", "toymix", *QUICK[:-4], "--probe-steps", "8", "--probe-batch", "4", "--out", "card"]) == 2
    assert "probe_steps 4 -> 8" in capsys.readouterr().err
    assert json.loads((card_dir / "check.json").read_text())["probe"] == again["probe"]
