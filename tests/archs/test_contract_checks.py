"""`archs.contract` catches what it should: broken mixers made here each fail exactly their check, and the
message says where (the position, or the sizes) — the verdicts a plugin author gets."""

from __future__ import annotations

import re

import torch
from torch import nn

from archs.contract import CHECKS, check_mixer
from archs.mixers import Mixer, MixerCache


class RunningMean(Mixer):
    """A correct minimal mixer: the causal running mean of a projection."""

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        steps = torch.arange(1, x.shape[1] + 1, device=x.device)[None, :, None]
        return self.proj(x).cumsum(1) / steps


class ReadsTheNextToken(RunningMean):
    def forward(self, x):
        return super().forward(x) + 0.5 * torch.roll(x, shifts=-1, dims=1)


class MixesBatchRows(RunningMean):
    def forward(self, x):
        return super().forward(x) + x.mean(0, keepdim=True)


class NaNInBF16(RunningMean):
    def forward(self, x):
        y = super().forward(x)
        return y * torch.nan if x.dtype == torch.bfloat16 else y


class _SumCache(MixerCache):
    def __init__(self, batch: int, d: int):
        self.total = torch.zeros(batch, 1, d)
        self.length = 0


class StepDrifts(RunningMean):
    """Decodes with its own cache, but forgets to divide by the count after the 7th token."""

    def init_cache(self, batch_size, max_len, device=None, dtype=None):
        return _SumCache(batch_size, self.d_model)

    def step(self, x, cache):
        outs = []
        for t in range(x.shape[1]):
            cache.total = cache.total + self.proj(x[:, t: t + 1])
            cache.length += 1
            outs.append(cache.total / (cache.length if cache.length <= 7 else 1))
        return torch.cat(outs, 1)

    def state_bytes(self, seq_len, batch_size=1, dtype=None):
        return batch_size * self.d_model * 4


class LiesAboutItsState(RunningMean):
    def state_bytes(self, seq_len, batch_size=1, dtype=None):
        return 64  # the default cache holds every input so far


def verdicts(cls) -> dict[str, object]:
    return {c.name: c for c in check_mixer(cls, d_model=16)}


def failed(cls) -> list[str]:
    return [name for name, c in verdicts(cls).items() if not c.passed]


def test_a_correct_mixer_passes_every_check():
    assert failed(RunningMean) == []
    assert set(verdicts(RunningMean)) == set(CHECKS)


def test_reading_the_next_token_fails_causality_at_the_position():
    # decoding fails too, necessarily: a one-token step cannot see the token the forward peeked at
    assert failed(ReadsTheNextToken) == ["causality", "decoding"]
    where = verdicts(ReadsTheNextToken)["causality"].where
    # the output at t reads input t + 1: changing inputs after t changes position t itself
    assert re.search(r"changing inputs after position (\d+) changed the output at position \1 by", where), where


def test_mixing_batch_rows_fails_batch_independence():
    assert failed(MixesBatchRows) == ["batch_independence"]
    assert "first at position 0" in verdicts(MixesBatchRows)["batch_independence"].where


def test_nan_in_bf16_fails_only_the_bf16_check():
    assert failed(NaNInBF16) == ["finite_bf16"]
    assert "(batch, position, channel) = (0, 0, 0)" in verdicts(NaNInBF16)["finite_bf16"].where


def test_a_step_that_drifts_fails_decoding_at_the_first_wrong_position():
    assert failed(StepDrifts) == ["decoding"]
    assert "prefill 1: position 7 differs" in verdicts(StepDrifts)["decoding"].where


def test_a_state_bytes_that_lies_is_caught_with_both_sizes():
    assert failed(LiesAboutItsState) == ["state_bytes"]
    c = verdicts(LiesAboutItsState)["state_bytes"]
    assert c.where == f"state_bytes says 64, the cache holds {2 * 13 * 16 * 4}"
