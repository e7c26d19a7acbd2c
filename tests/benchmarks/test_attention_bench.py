"""The attention benchmark: a subset of cases runs, each row's memory is read against its own math baseline."""

import pytest

from benchmarks.attention import main


def test_unknown_case_names_the_cases(capsys):
    with pytest.raises(SystemExit):
        main(["--cases", "nosuchkernel"])
    assert "attention/sdpa, ALiBi" in capsys.readouterr().err


@pytest.mark.slow
def test_alibi_rows_against_the_alibi_math_row(tmp_path):
    main(["--cases", "alibi", "--lengths", "64", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "a")])
    rows = [line.split(" | ") for line in (tmp_path / "a.md").read_text().splitlines() if line.startswith("| 64 |")]
    assert [r[1] for r in rows] == ["attention/math, ALiBi", "attention/sdpa, ALiBi"]
    assert rows[0][-1] == "1.000 |"  # the math row is its own baseline
    assert "attention/sdpa |" not in (tmp_path / "a.md").read_text()  # not asked for
