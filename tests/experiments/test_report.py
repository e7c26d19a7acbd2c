"""Reports: tables, figures, power-law fits, colours and status from real Optuna studies of fabricated trials.

The studies live in a temporary SQLite file; trials are made with ``optuna.trial.create_trial`` and carry the
user attrs the study engine stores: ``config``, and a `TrialSummary` (with its measurements, in the shape the
probes return) stored by `ledger.summary_attrs`, as `StudyRunner.store` stores it. The fabricated losses follow
exact power laws, so the fitted exponents are known.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import xml.etree.ElementTree as ET

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from experiments.report import (
    FAMILY_COLOURS,
    default_family,
    family_colour,
    family_colours,
    fmt_number,
    status_text,
    write_report,
)
from experiments.runs import SCOPE_STEPS, TrialSummary
from experiments.study.ledger import FINAL, summary_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)

# family -> (coefficient, exponent) of val_bpb = c * params ** k, and its layer pattern
LAWS = {"attention": (3.0, -0.1), "mamba": (4.0, -0.12), "hybrid": (3.5, -0.11)}
PATTERNS = {"attention": "AAAA", "mamba": "MMMM", "hybrid": "MMMA"}
WIDTHS = (32, 64, 128)
MACHINE = {"cpu": "Test CPU 9000", "torch": "2.13.0", "cuda_device": None, "torch_threads": 2}
DIST = {"variant": CategoricalDistribution(list(LAWS)), "model.d_model": CategoricalDistribution(list(WIDTHS)),
        "model.n_layers": IntDistribution(2, 8)}


def n_params(d: int, n_layers: int = 4) -> int:
    return 12 * n_layers * d * d + 260 * d


def corpus_summary(family: str, d: int, bpb: float, status: str = "completed", measured: bool = False) -> dict:
    params = n_params(d)
    steps = 100 if status == "completed" else 40
    curve = [(s, bpb * (1 + 3.0 / s ** 0.8)) for s in range(10, steps + 1, 10)]  # decreasing to bpb
    evals = [{"step": s, "tokens": s * 2048, "val_bpb": b, "val_loss": b * math.log(2),
              "val_ppl": math.exp(b * math.log(2)), "val_tokens": 4096} for s, b in curve]
    summary = TrialSummary(
        status=status, steps=steps, total_steps=100, tokens=steps * 2048,
        final={"val_loss": bpb * math.log(2), "val_ppl": math.exp(bpb * math.log(2)), "val_bpb": bpb,
               "val_tokens": 4096},
        evals=evals, train_seconds=12.5, tokens_per_s=16384.4 + d, params=params,
        params_non_embedding=params - 260 * d, flops_per_token=6 * params, state_bytes=1000 * d,
        backends={"0:attention": "sdpa"} if family == "attention" else
        {"0:mamba": "torch-scan", **({"3:attention": "sdpa"} if family == "hybrid" else {})},
        device="cpu", precision="fp32", peak_memory_mib=100.0 + d * 1.5, memory_method="VmHWM - baseline",
        memory_scope=SCOPE_STEPS, corpus_hash="abcdef0123456789abcdef", unigram_bpb=4.9,
        layer_pattern=PATTERNS[family], model={"d_model": d, "n_layers": 4}, machine=MACHINE,
        measure=measure(family) if measured else {})
    return summary_attrs(summary)


def config(family: str, d: int) -> dict:
    return {"model": {"d_model": d, "n_layers": 4, "n_heads": 4},
            "train": {"seq_len": 128, "steps": 100}, "data": {"corpus": "stdlib"}}


def measure(family: str) -> dict:
    """Long-context measurements as `run_probes` returns them (scaling, decode and loss-vs-length probes)."""
    grow = 2.0 if family == "attention" else 1.0
    memory = [{"seq_len": t, "peak_bytes": 2**20 * (t / 256) ** grow * 10, "time_s": 0.01 * (t / 256) ** grow,
               "status": "ok"} for t in (256, 512, 1024, 2048)]
    memory.append({"seq_len": 4096, "status": "skipped: predicted 9.0 GiB > 80% of the 8.0 GiB available"})
    decode = [{"context": c, "latency_s": (1.0 + (c / 1024 if family == "attention" else 0)) / 1e3,
               "cache_bytes": (c * 512 if family == "attention" else 65536), "status": "ok"} for c in (256, 1024, 4096)]
    loss = [{"seq_len": t, "loss": 1.5 + (0.3 * t / 128 if family == "attention" else 0.01 * t / 128),
             "status": "ok"} for t in (128, 256, 512)]
    return {"memory": {"probe": "scaling", "rows": memory}, "decode": {"probe": "decode", "rows": decode},
            "context": {"probe": "loss_vs_length", "rows": loss}}


def stored(**fields) -> dict:
    """The user attrs of a trial whose summary has ``fields``, as the study engine stores them."""
    return summary_attrs(TrialSummary(**{"status": "completed", **fields}))


def add(study: optuna.Study, state: TrialState, params: dict, attrs: dict, values=None, intermediate=None):
    dists = {k: DIST[k] for k in params}
    study.add_trial(create_trial(state=state, params=params, distributions=dists, user_attrs=attrs, values=values,
                                 intermediate_values=intermediate))
    return study.trials[-1]


def make_corpus_study(storage: str) -> optuna.Study:
    study = optuna.create_study(study_name="scaling-test", storage=storage, direction="minimize")
    study.set_metric_names(["val_bpb"])
    for family, (c, k) in LAWS.items():
        for d in WIDTHS:
            bpb = c * n_params(d) ** k
            attrs = {"config": config(family, d), **corpus_summary(family, d, bpb, measured=d == 64)}
            add(study, TrialState.COMPLETE, {"variant": family, "model.d_model": d}, attrs, [bpb])
    # a worse run at an existing size (another learning rate): must not move the fit
    bad = LAWS["attention"][0] * n_params(64) ** LAWS["attention"][1] * 1.2
    add(study, TrialState.COMPLETE, {"variant": "attention", "model.d_model": 64},
        {"config": config("attention", 64), **corpus_summary("attention", 64, bad)}, [bad])
    add(study, TrialState.PRUNED, {"variant": "mamba", "model.d_model": 32},
        {"config": config("mamba", 32), **corpus_summary("mamba", 32, 1.3, status="pruned")},
        intermediate={20: 1.6, 40: 1.5})
    add(study, TrialState.FAIL, {"variant": "hybrid", "model.d_model": 128},
        {"config": config("hybrid", 128), "fail_reason": "killed by SIGKILL (out of memory?)", FINAL: True})
    add(study, TrialState.FAIL, {"variant": "mamba", "model.d_model": 128},
        {"config": config("mamba", 128), "fail_reason": "interrupted (Ctrl-C); will be redone on resume"})
    add(study, TrialState.RUNNING, {"variant": "attention", "model.d_model": 128}, {})
    study.enqueue_trial({"variant": "mamba", "model.d_model": 64})
    study.enqueue_trial({"variant": "attention", "model.d_model": 32})
    return study


def task_summary(pattern: str, d: int, acc: float, mem: float) -> dict:
    summary = TrialSummary(
        status="completed", steps=200, total_steps=200, tokens=200 * 4096,
        final={"accuracy": acc, "exact_match": acc * 0.8,
               "by": {"seq_len": {64: min(1.0, acc + 0.1), 128: acc, 256: acc / 2},
                      "num_kv_pairs": {4: acc + 0.05, 16: acc - 0.05}}},
        evals=[{"step": s, "tokens": s * 4096, "accuracy": acc * s / 200, "exact_match": acc * 0.8 * s / 200}
               for s in (50, 100, 150, 200)],
        train_seconds=30.0, tokens_per_s=27306.7, params=n_params(d), flops_per_token=6 * n_params(d),
        backends={"0:attention": "math"}, device="cpu", precision="fp32", peak_memory_mib=mem,
        memory_method="VmHWM - baseline", memory_scope=SCOPE_STEPS, task="mqar", layer_pattern=pattern,
        model={"d_model": d, "n_layers": 4}, machine=MACHINE)
    return summary_attrs(summary)


def make_task_study(storage: str) -> optuna.Study:
    study = optuna.create_study(study_name="mqar-pareto", storage=storage, directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "peak_memory_mib"])
    cells = [("AAAA", 64, 0.95, 400.0), ("MMMM", 64, 0.60, 150.0), ("MMMA", 64, 0.90, 220.0),
             ("SSSS", 64, 0.55, 160.0), ("AAAA", 32, 0.80, 450.0)]
    for pattern, d, acc, mem in cells:
        cfg = {"model": {"d_model": d, "n_layers": 4, "pattern": pattern}, "train": {"seq_len": 128},
               "data": {"task": "mqar"}}
        attrs = {"config": cfg, **task_summary(pattern, d, acc, mem)}
        add(study, TrialState.COMPLETE, {"model.d_model": d}, attrs, [acc, mem])
    return study


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    study = make_corpus_study(f"sqlite:///{root / 'study.db'}")
    info = {"name": "scaling-test", "scale": "cpu", "description": "Fabricated scaling study.", "report": {}}
    return study, write_report(study, root / "out", recipe_info=info), root / "out"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-task")
    study = make_task_study(f"sqlite:///{root / 'study.db'}")
    figures = ["pareto", "accuracy_vs_len", "history", "learning_curves", "memory_time_vs_len"]
    return study, write_report(study, root / "out", figures=figures), root / "out"


def md_rows(path) -> list[list[str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def test_files_exist_and_images_are_valid(corpus, task):
    for _, paths, out in (corpus, task):
        assert paths["table.md"] == out / "table.md" and paths["table.csv"].is_file()
        for name, path in paths.items():
            assert path.is_file() and path.stat().st_size > 0, name
            if name.endswith(".png"):
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
            if name.endswith(".svg"):
                assert ET.parse(path).getroot().tag.endswith("svg")
                assert path.with_suffix(".png").is_file()
    corpus_figs = {n for n in corpus[1] if n.endswith(".png")}
    assert {"scaling_params.png", "scaling_flops.png", "learning_curves.png", "memory_time_vs_len.png",
            "decode_vs_context.png", "loss_vs_len.png", "history.png"} <= corpus_figs
    assert {"pareto", "accuracy_vs_len", "recall_vs_state"} <= set(corpus[1].skipped)
    task_figs = {n for n in task[1] if n.endswith(".png")}
    assert {"pareto.png", "accuracy_vs_len.png", "history.png", "learning_curves.png"} <= task_figs
    assert "memory_time_vs_len" in task[1].skipped  # no measure data: skipped, not an error


def test_fitted_exponents_match_the_fabricated_power_laws(corpus):
    fits = corpus[1].fits
    for family, (c, k) in LAWS.items():
        assert fits["params"][family]["exponent"] == pytest.approx(k, abs=1e-6)
        assert fits["params"][family]["coef"] == pytest.approx(c, rel=1e-6)
        assert fits["flops_per_token"][family]["exponent"] == pytest.approx(k, abs=1e-6)  # flops = 6 N
        assert fits["params"][family]["n"] == 3


def test_markdown_table(corpus):
    study, paths, _ = corpus
    text = paths["table.md"].read_text()
    header = text.splitlines()[0]
    for part in ("scaling-test", "val_bpb (bits/byte)", "abcdef012345", "2.13.0", "Test CPU 9000", "corpus stdlib"):
        assert part in header, part
    assert datetime.date.today().isoformat()[:4] in header or "20" in header  # a date
    assert "mixerlab reproduce scaling-test --scale cpu" in text
    rows = md_rows(paths["table.md"])
    head, body = rows[0], rows[2:]
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert len(body) == len(finished) == 13
    assert [r[head.index("trial")] for r in body].count("9") == 1
    by_trial = {int(r[head.index("trial")]): dict(zip(head, r, strict=True)) for r in body}
    t0 = by_trial[0]  # attention, d_model 32
    bpb = 3.0 * n_params(32) ** -0.1
    assert t0["family"] == "attention" and t0["layers"] == "`AAAA`" and t0["d_model"] == "32"
    assert t0["params"] == f"{n_params(32):,}" and "," in t0["params"]
    assert t0["val bpb (bits/byte)"] == f"{bpb:.4g}"
    assert t0["val ppl"] == f"{math.exp(bpb * math.log(2)):.4g}"
    assert t0["tokens/s"] == "16,416"  # 16384.4 + 32, rounded, thousands separator
    assert t0["peak MiB"] == "148"
    assert t0["backends"] == "sdpa" and t0["status"] == "complete"
    assert by_trial[7]["backends"] == "sdpa, torch-scan"  # the hybrid ran both
    failed = [r for r in by_trial.values() if r["status"].startswith("failed")]
    assert any("killed by SIGKILL (out of memory?)" in r["status"] for r in failed)
    assert any(r["status"] == "pruned at step 40/100" for r in by_trial.values())
    with_measure = by_trial[1]  # attention d_model 64 carries long-context measurements
    assert with_measure["memory ∝ T^k"] == "2" and with_measure["longest T measured"] == "2,048"
    assert by_trial[4]["memory ∝ T^k"] == "1"  # mamba: flat growth fabricated as T^1
    # sorted by family (attention, mamba, hybrid), then size
    families = [r[head.index("family")] for r in body]
    assert families == sorted(families, key=["attention", "mamba", "hybrid"].index)


def test_csv_parses_back(corpus):
    with corpus[1]["table.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13
    by_trial = {int(r["trial"]): r for r in rows}
    for t in (0, 4, 8):
        family = by_trial[t]["family"]
        c, k = LAWS[family]
        d = int(by_trial[t]["d_model"])
        assert int(by_trial[t]["params"]) == n_params(d)
        assert float(by_trial[t]["val_bpb"]) == pytest.approx(c * n_params(d) ** k, rel=1e-12)
        assert float(by_trial[t]["peak_memory_mib"]) == pytest.approx(100.0 + d * 1.5)
    fail = [r for r in rows if r["status"] == "failed"]
    assert {r["reason"] for r in fail} == {"killed by SIGKILL (out of memory?)",
                                          "interrupted (Ctrl-C); will be redone on resume"}
    assert all(r["val_bpb"] == "" for r in fail)
    assert float(by_trial[1]["time_exponent"]) == pytest.approx(2.0)


def test_task_table_has_accuracy_slices_and_pareto(task):
    study, paths, _ = task
    rows = md_rows(paths["table.md"])
    head, body = rows[0], rows[2:]
    assert len(body) == 5
    for col in ("accuracy", "acc seq_len=64", "acc seq_len=256", "acc num_kv_pairs=16", "Pareto", "peak MiB"):
        assert col in head, col
    assert head.index("acc seq_len=64") < head.index("acc seq_len=128") < head.index("acc seq_len=256")
    assert "val bpb (bits/byte)" not in head
    by_trial = {int(r[head.index("trial")]): dict(zip(head, r, strict=True)) for r in body}
    assert by_trial[2]["family"] == "hybrid MMMA" and by_trial[3]["family"] == "mamba2"
    assert by_trial[0]["accuracy"] == "0.95" and by_trial[0]["acc seq_len=256"] == "0.475"
    front = {t.number for t in study.best_trials}
    assert {n for n, r in by_trial.items() if r["Pareto"] == "★"} == front == {0, 1, 2}
    assert "task mqar" in paths["table.md"].read_text().splitlines()[0]


def test_family_colours_are_fixed_and_shared_by_every_figure(corpus, task):
    assert family_colour("attention") == FAMILY_COLOURS["attention"] == "#1f77b4"
    assert family_colour("mamba") == "#ff7f0e" and family_colour("mamba2") == "#2ca02c"
    assert family_colour("sliding_window_attention") == family_colour("swa") == "#8c564b"
    assert family_colour("xformers_attention") == "#17becf"
    assert family_colour("hybrid MMMA") == family_colour("hybrid MMMA")
    assert family_colour("hybrid MMMA") in ("#9467bd", "#d62728", "#e377c2", "#5e3c99", "#a50f15", "#c51b7d")
    assert family_colour("my_plugin_mixer") == family_colour("my_plugin_mixer") not in FAMILY_COLOURS.values()
    # every figure draws a family in its report's colour: the colour appears in each SVG that shows the family
    for _, paths, out in (corpus, task):
        families = {r["family"] for r in paths.rows if r["status"] == "complete"}
        colours = json.loads(paths["report.json"].read_text())["colours"]
        assert {f: colours[f] for f in families} == {f: family_colours(families)[f] for f in families}
        assert colours["attention"] == "#1f77b4" and len(set(colours.values())) == len(colours)
        colours = {f: colours[f] for f in families}
        for name in ("scaling_params.svg", "learning_curves.svg", "history.svg", "pareto.svg", "accuracy_vs_len.svg"):
            if name in paths:
                svg = (out / name).read_text().lower()
                for family, colour in colours.items():
                    assert colour in svg, (name, family, colour)


def test_variants_of_one_family_get_distinct_shades_of_its_colour():
    """The induction recipe's variants: four attention variants, all blue but each its own blue."""
    fams = ["attention-learned", "attention-rope", "attention-alibi", "attention-none", "mamba", "mamba2",
            "hybrid MMMA", "hybrid MA", "my_plugin", "other_plugin"]
    colours = family_colours(fams)
    assert len(set(colours.values())) == len(fams)  # all different
    blues = {colours[f] for f in fams[:4]}
    assert all(int(c[5:7], 16) > int(c[1:3], 16) for c in blues)  # blue dominates red in each
    assert colours["mamba"] == "#ff7f0e" and colours["mamba2"] == "#2ca02c"
    assert family_colours(reversed(fams)) == colours  # the same set, the same colours


def test_default_family_and_override(corpus, tmp_path):
    study = corpus[0]
    assert default_family(study.trials[0]) == "attention"  # the variant param
    trial = create_trial(state=TrialState.COMPLETE, value=1.0, params={}, distributions={},
                         user_attrs=stored(layer_pattern="MMMAMM"))
    assert default_family(trial) == "hybrid MMMA"
    trial = create_trial(state=TrialState.COMPLETE, value=1.0, params={}, distributions={},
                         user_attrs={"config": {"model": {"pattern": "SS", "n_layers": 6}}})
    assert default_family(trial) == "mamba2"
    paths = write_report(study, tmp_path, family_of=lambda t: "all", figures=["history"])
    assert set(paths.fits["params"]) == {"all"}  # fits are computed even when their figure is not drawn
    assert {n for n in paths if n.endswith(".png")} == {"history.png"}
    assert "all" in paths["table.md"].read_text()
    with pytest.raises(ValueError, match="unknown figure"):
        write_report(study, tmp_path, figures=["scaling"])


def test_fmt_number():
    assert fmt_number(1234567) == "1,234,567"
    assert fmt_number(12345.67) == "12,346"
    assert fmt_number(2.345678) == "2.346"
    assert fmt_number(0.91234) == "0.9123"
    assert fmt_number(None) == "" and fmt_number(float("nan")) == "nan"


def test_status_text(corpus, task):
    text = status_text(corpus[0])
    assert "13 done (10 complete, 1 pruned, 2 failed, 1 of them interrupted), 1 running, 2 waiting" in text
    best = min((t for t in corpus[0].trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"best so far: trial #{best.number} (" in text and "bits/byte" in text
    assert "killed by SIGKILL" in text
    text = status_text(task[0])
    assert "5 done (5 complete, 0 pruned, 0 failed), 0 running, 0 waiting" in text
    assert "Pareto front: 3 trial(s)" in text


def test_empty_study(tmp_path):
    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 'e.db'}")
    paths = write_report(study, tmp_path / "out")
    assert "No finished trials" in paths["table.md"].read_text()
    assert "best so far: none" in status_text(study)


def test_best_of_a_learning_rate_sweep_per_cell(tmp_path):
    study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["maximize"])
    study.set_metric_names(["accuracy"])
    dist = {"variant": CategoricalDistribution(["attention", "mamba"]),
            "train.lr": CategoricalDistribution([0.001, 0.01])}
    acc = {("attention", 0.001): 0.5, ("attention", 0.01): 0.9, ("mamba", 0.001): 0.7, ("mamba", 0.01): 0.2}
    for (variant, lr), a in acc.items():
        summary = stored(final={"accuracy": a}, params=1000, layer_pattern="AA",
                         target_reached_step=300 if a >= 0.9 else None)  # train.target_accuracy = 0.9
        study.add_trial(create_trial(params={"variant": variant, "train.lr": lr}, distributions=dist, value=a,
                                     user_attrs={**summary, "config": {"model": {"d_model": 32}}}))
    paths = write_report(study, tmp_path / "out", recipe_info={"name": "sweep", "report": {"best_over": ["train.lr"]}},
                         figures=[])
    best = list(csv.DictReader(paths["table.csv"].open()))
    every = list(csv.DictReader(paths["table_all.csv"].open()))
    assert len(every) == 4 and len(best) == 2
    chosen = {r["family"]: (float(r["accuracy"]), r["best_of"]) for r in best}
    assert chosen["attention"] == (0.9, "train.lr=0.01 (best of 2)")
    assert chosen["mamba"] == (0.7, "train.lr=0.001 (best of 2)")
    steps = {r["family"]: r["steps_to_target"] for r in best}
    assert steps == {"attention": "300", "mamba": ""}  # blank: not reached within the step budget
    assert "steps to target" in paths["table.md"].read_text()


def test_zoology_layout_accuracy_vs_width_per_length(tmp_path):
    """An MQAR-like grid: family x length x d_model x lr. The table keeps the best lr per cell (ties: fewer
    steps to target), shows the training length, and accuracy_vs_width draws one panel per length."""
    study = optuna.create_study(study_name="mqar", storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"])
    study.set_metric_names(["accuracy"])
    dist = {"variant": CategoricalDistribution(["attention", "mamba"]),
            "length": CategoricalDistribution(["T64", "T256"]),
            "model.d_model": CategoricalDistribution([32, 64]), "train.lr": CategoricalDistribution([0.003, 0.01])}
    for variant in ("attention", "mamba"):
        for length, seq in (("T64", 64), ("T256", 256)):
            for d in (32, 64):
                for lr in (0.003, 0.01):
                    solved = variant == "attention" or (d == 64 and seq == 64)
                    acc = 1.0 if solved else 0.1 * d / 32 + lr
                    steps = (100 if lr == 0.01 else 300) if solved else None
                    summary = stored(final={"accuracy": acc, "by": {"seq_len": {seq: acc}}}, params=100 * d,
                                     layer_pattern="AA" if variant == "attention" else "MM",
                                     target_reached_step=steps, model={"d_model": d, "n_layers": 2},
                                     state_bytes=4 * 2 * (2 * seq * d if variant == "attention" else 32 * d))
                    cfg = {"model": {"d_model": d}, "train": {"seq_len": seq, "lr": lr}}
                    study.add_trial(create_trial(
                        params={"variant": variant, "length": length, "model.d_model": d, "train.lr": lr},
                        distributions=dist, value=acc, user_attrs={**summary, "config": cfg}))
    paths = write_report(study, tmp_path / "out", recipe_info={"name": "mqar", "report": {"best_over": ["train.lr"]}})
    best = list(csv.DictReader(paths["table.csv"].open()))
    assert len(best) == 8 and {r["seq_len"] for r in best} == {"64", "256"}
    attention = [r for r in best if r["family"] == "attention"]
    assert all(r["best_of"].startswith("train.lr=0.01") and r["steps_to_target"] == "100" for r in attention)
    mamba_256_32 = next(r for r in best if r["family"] == "mamba" and r["seq_len"] == "256" and r["d_model"] == "32")
    assert float(mamba_256_32["accuracy"]) == pytest.approx(0.11) and mamba_256_32["steps_to_target"] == ""
    assert "| train T |" in paths["table.md"].read_text()
    assert "acc seq_len" not in paths["table.md"].read_text()  # one slice per trial, its own: no extra columns
    png = paths["accuracy_vs_width.png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths["accuracy_vs_width.svg"].read_text()
    assert "sequence length 64" in svg and "sequence length 256" in svg and "model dimension d_model" in svg
    state = paths["recall_vs_state.svg"].read_text()  # Based's Figure 2: a panel per length, state on log axis
    assert "sequence length 64" in state and "sequence length 256" in state and "recurrent state" in state
    assert "recall_vs_state" not in paths.skipped


def test_the_accuracy_panels_legend_every_family_of_every_panel(tmp_path):
    """A family that has run at one length only (a study in progress) is in the legend, which the last panel
    holds, as well as the families of that panel."""
    study = optuna.create_study(study_name="part", storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"])
    study.set_metric_names(["accuracy"])
    dist = {"variant": CategoricalDistribution(["attention", "hyena"]),
            "length": CategoricalDistribution(["T64", "T256"]), "model.d_model": CategoricalDistribution([32, 64])}
    cells = [("attention", "T64", 64), ("attention", "T256", 256), ("hyena", "T64", 64)]  # no hyena at T256 yet
    for variant, length, seq in cells:
        for d in (32, 64):
            summary = stored(final={"accuracy": 0.5, "by": {"seq_len": {seq: 0.5}}}, params=100 * d,
                             layer_pattern="AA" if variant == "attention" else "YY",
                             model={"d_model": d, "n_layers": 2}, state_bytes=4 * d * seq)
            study.add_trial(create_trial(params={"variant": variant, "length": length, "model.d_model": d},
                                         distributions=dist, value=0.5,
                                         user_attrs={**summary, "config": {"train": {"seq_len": seq}}}))
    paths = write_report(study, tmp_path / "out", recipe_info={"name": "part"})
    for name in ("accuracy_vs_width", "recall_vs_state"):
        svg = paths[f"{name}.svg"].read_text()
        assert svg.count(">hyena<") == 1 and svg.count(">attention<") == 1, name  # one legend, both families


def test_a_redone_trial_replaces_the_failed_one_in_the_table(tmp_path):
    study = optuna.create_study(study_name="redo", storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize"])
    study.set_metric_names(["accuracy"])
    dist = {"variant": CategoricalDistribution(["attention", "mamba"])}
    attrs = {**stored(final={"accuracy": 0.9}, params=1000, layer_pattern="AA"), "config": {"model": {"d_model": 32}}}
    study.add_trial(create_trial(params={"variant": "attention"}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs={"fail_reason": "worker host:1 died", **attrs}))
    study.add_trial(create_trial(params={"variant": "attention"}, distributions=dist, value=0.9,
                                 user_attrs={"retry_of": 0, **attrs}))
    study.add_trial(create_trial(params={"variant": "mamba"}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs={"fail_reason": "crashed (exit 1): boom", FINAL: True, **attrs}))
    study.add_trial(create_trial(params={"variant": "mamba"}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs=attrs))  # a dead worker's trial, retried by Optuna's heartbeat callback
    study.add_trial(create_trial(params={"variant": "mamba"}, distributions=dist, value=0.5,
                                 system_attrs={"failed_trial": 3}, user_attrs=attrs))
    paths = write_report(study, tmp_path / "out", figures=[])
    rows = list(csv.DictReader(paths["table.csv"].open()))
    assert sorted((r["trial"], r["status"]) for r in rows) == [("1", "complete"), ("2", "failed"), ("4", "complete")]
    assert "2 failed or interrupted trial(s) were redone" in paths["table.md"].read_text().splitlines()[0]
