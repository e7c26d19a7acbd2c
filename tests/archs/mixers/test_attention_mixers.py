"""The attention mixers against each other: same weights, same maths, different kernels."""

import pytest
import torch

from registry import MIXERS

D = 64


def pair(fast_name: str, fast_opts: dict, ref_opts: dict, ref_name: str = "attention"):
    ref = MIXERS.create(ref_name, d_model=D, **ref_opts)
    fast = MIXERS.create(fast_name, d_model=D, **fast_opts)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def check(fast, ref, t: int):
    x = torch.randn(2, t, D, requires_grad=True)
    outs, grads = [], []
    for m in (fast, ref):
        x.grad = None
        m.zero_grad()
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 7, 63, 257])
@pytest.mark.parametrize("positions", ["none", "rope", "alibi"])
def test_sdpa_matches_math(t, positions):
    check(*pair("attention", {"impl": "sdpa", "positions": positions},
                {"impl": "math", "positions": positions}), t)


@pytest.mark.parametrize("t", [1, 7, 63, 257])
@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_xformers_cpu_path_matches_math(t, impl):
    fast, ref = pair("xformers_attention", {"impl": impl, "chunk_size": 32, "positions": "rope"},
                     {"impl": "math", "positions": "rope"})
    check(fast, ref, t)
    assert fast.backend == ("sdpa-flash" if impl == "auto" else "chunked")


def test_xformers_alibi_falls_back_to_chunked_and_says_so(caplog):
    fast, ref = pair("xformers_attention", {"positions": "alibi", "chunk_size": 16},
                     {"impl": "math", "positions": "alibi"})
    with caplog.at_level("INFO", logger="mixerlab"):
        check(fast, ref, 40)
    assert fast.backend == "chunked"


def test_xformers_impl_on_cpu_is_a_clear_error():
    m = MIXERS.create("xformers_attention", d_model=D, impl="xformers")
    with pytest.raises(RuntimeError, match="needs the input on a CUDA device"):
        m(torch.randn(1, 4, D))


@pytest.mark.parametrize("t", [1, 7, 63, 257])
@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_sliding_window_matches_masked_math(t, impl):
    fast, ref = pair("sliding_window_attention", {"impl": impl, "window": 16},
                     {"impl": "math", "window": 16}, ref_name="sliding_window_attention")
    check(fast, ref, t)


def test_sliding_window_equals_full_attention_when_window_covers_sequence():
    fast, ref = pair("sliding_window_attention", {"window": 64, "positions": "rope"},
                     {"impl": "math", "positions": "rope"})
    check(fast, ref, 50)


def test_gqa_reduces_kv_cache():
    full = MIXERS.create("attention", d_model=D, n_heads=8)
    gqa = MIXERS.create("attention", d_model=D, n_heads=8, n_kv_heads=2)
    assert gqa.state_bytes(100) * 4 == full.state_bytes(100)
    assert gqa(torch.randn(1, 9, D)).shape == (1, 9, D)


def test_sliding_window_cache_is_bounded():
    m = MIXERS.create("sliding_window_attention", d_model=D, window=8)
    assert m.state_bytes(1000) == m.state_bytes(7) == m.state_bytes(50)


@pytest.mark.gpu
def test_xformers_kernel_matches_sdpa_on_cuda():
    pytest.importorskip("xformers.ops")
    fast, ref = pair("xformers_attention", {"impl": "xformers", "positions": "rope"},
                     {"impl": "sdpa", "positions": "rope"})
    fast, ref = fast.cuda(), ref.cuda()
    x = torch.randn(2, 257, D, device="cuda")
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-3, atol=2e-3)
    assert fast.backend == "xformers"
