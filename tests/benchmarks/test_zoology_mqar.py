"""The Zoology MQAR probe: its FFT long convolution is the causal convolution it stands for, its block stack
is causal, its query-only logits are the full tied LM head's at those positions, and a tiny run trains and
reports one line per epoch."""

import re

import pytest
import torch

from benchmarks.zoology_mqar import ZoologyLM, _ImplicitLongConv, main


@pytest.mark.parametrize("filter", ["zoology", "hyena"])
def test_the_fft_long_convolution_is_the_causal_convolution_plus_its_skip(filter):
    torch.manual_seed(0)
    conv = _ImplicitLongConv(d=5, l_max=13, filter=filter)
    for p in conv.mlp.parameters():  # a filter of order one, not the near-zero one of the 0.02 init
        torch.nn.init.normal_(p, std=1.0)
    u = torch.randn(3, 11, 5, dtype=torch.float64)
    conv = conv.double()
    h = conv.mlp(conv.z[:11]) * torch.exp(-conv.t[:11] * conv.decay)  # (L, D)
    direct = torch.stack([sum(h[s] * u[:, t - s] for s in range(t + 1)) for t in range(11)], dim=1)
    torch.testing.assert_close(conv(u), direct + u)


def test_zoologys_filter_is_a_relu_mlp_of_the_position_without_a_window():
    """Zoology's BaseConv filter (its ImplicitLongConvolution): Linear(3, 16), ReLU, Linear(16, d), nothing
    decaying it with the lag, unlike Hyena's."""
    conv = _ImplicitLongConv(d=4, l_max=8, filter="zoology")
    assert [type(m) for m in conv.mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert conv.mlp[0].in_features == 3 and conv.mlp[2].out_features == 4
    assert torch.count_nonzero(conv.decay) == 0
    assert torch.all(_ImplicitLongConv(d=4, l_max=8, filter="hyena").decay > 0)
    with pytest.raises(ValueError, match="filter must be"):
        _ImplicitLongConv(d=4, l_max=8, filter="sine")


def test_outputs_do_not_see_the_future_and_query_logits_are_the_lm_heads():
    torch.manual_seed(0)
    model = ZoologyLM(vocab=32, d=8, layers=4, l_max=16, embed_dropout=0.0).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 32, (2, 16))
    everywhere = torch.cartesian_prod(torch.arange(2), torch.arange(16))
    full = model(ids, everywhere).view(2, 16, 32)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 32
    torch.testing.assert_close(model(changed, everywhere).view(2, 16, 32)[:, :9], full[:, :9])
    assert not torch.allclose(model(changed, everywhere).view(2, 16, 32)[:, 9:], full[:, 9:])
    where = torch.tensor([[0, 3], [1, 15], [1, 0]])
    torch.testing.assert_close(model(ids, where), full[where[:, 0], where[:, 1]])


def test_a_tiny_run_prints_one_line_per_epoch(capsys):
    main(["--vocab", "32", "--d-model", "8", "--seq-len", "16", "--kv-pairs", "2", "--layers", "2",
          "--batch", "16", "--train-examples", "48", "--epochs", "2"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    assert [int(re.search(r"step (\d+)", x).group(1)) for x in lines] == [3, 6]
    for line in lines:
        loss, acc = (float(v) for v in re.search(r"train loss ([\d.]+) test accuracy ([\d.]+)", line).groups())
        assert loss > 0 and 0.0 <= acc <= 1.0
