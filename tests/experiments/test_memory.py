"""A trial's peak memory measures its model: parameters, gradients, optimiser state and activations above a
baseline taken once the data is ready, not the corpus, the evaluation set or the imports.

Each trial runs in its own process (a study), as in production; no timing is asserted.
"""

import json

import pytest

from experiments.child import Isolation, run_isolated
from experiments.study import Recipe, StudyRunner, read_trials

MiB = 2**20
BASE = {
    "model": {"n_heads": 4, "mlp": "swiglu", "positions": "rope"},
    "train": {"steps": 3, "batch_size": 4, "seq_len": 512, "eval_interval": 3, "eval_batches": 1,
              "warmup_steps": 1, "log_interval": 1},
    "data": {"corpus": "stdlib"},
}


def run_grid(tmp_path, variants: dict, base: dict = BASE) -> dict:
    raw = {"name": "mem", "base": json.loads(json.dumps(base)), "sampler": {"kind": "grid"}, "variants": variants,
           "trial": {"threads": 1, "timeout_s": 600}}
    StudyRunner(Recipe.from_dict(raw), tmp_path, progress=False, log=lambda msg: None).run()
    study = StudyRunner(Recipe.from_dict(raw), tmp_path, progress=False)
    study.open(create=False)
    return {r.params["variant"]: r.summary for r in read_trials(study.study) if r.state == "complete"}


def test_peak_memory_grows_with_the_model_as_its_split_predicts(tmp_path):
    """2 x 64 vs 4 x 256 attention at T = 512: the figures differ by about what the larger model's
    parameters, gradients, AdamW state and saved activations add; and each matches `measure`'s training
    step of the same model (the `mixerlab measure memory --mode train` figure) within 20%."""
    small = {"model.n_layers": 2, "model.d_model": 64}
    large = {"model.n_layers": 4, "model.d_model": 256}
    got = run_grid(tmp_path, {"small": small, "large": large})
    s, big = got["small"], got["large"]
    assert s.memory_scope == big.memory_scope == "training steps"

    def predicted(summary) -> float:
        return sum(summary.memory_split.values()) / MiB

    assert big.memory_split["params"] == big.params * 4 and big.memory_split["optimizer"] >= 2 * big.params * 4
    assert big.peak_memory_mib > 4 * s.peak_memory_mib
    diff, expected = big.peak_memory_mib - s.peak_memory_mib, predicted(big) - predicted(s)
    assert expected * 0.8 < diff < expected * 1.5, (diff, expected, big.memory_split)
    for summary in (s, big):
        target = {"kind": "model", "spec": summary.model, "label": "trial model"}
        step = run_isolated("experiments.measure:bench", {"target": target, "seq_len": 512, "batch": 4,
                                                          "mode": "train", "repeats": 1}, Isolation(threads=1))
        assert abs(summary.peak_memory_mib - step["peak_bytes"] / MiB) < 0.2 * step["peak_bytes"] / MiB, (
            summary.peak_memory_mib, step["peak_bytes"] / MiB)


def test_a_known_buffer_shows_up_in_the_trials_figure(tmp_path):
    """A mixer that keeps a 64 MiB buffer from its first forward pass: its trial reads 64 MiB more than the
    same model without it, within a few MiB (the corpus and the test set sit in the baseline)."""
    base = json.loads(json.dumps(BASE))
    base["model"].update(d_model=32, n_layers=1, mlp="none")
    base["train"].update(seq_len=64)
    hoarder = "toymix_plugin.bad:Hoarder"
    got = run_grid(tmp_path, {
        "plain": {"model.mixer": hoarder, "model.mixer_options": {hoarder: {"mib": 0}}},
        "hoard": {"model.mixer": hoarder, "model.mixer_options": {hoarder: {"mib": 64}}},
    }, base)
    extra = got["hoard"].peak_memory_mib - got["plain"].peak_memory_mib
    assert extra == pytest.approx(64, abs=4)
    assert got["plain"].peak_memory_mib < 32  # a 1-layer d-32 model: the corpus and imports are not counted
