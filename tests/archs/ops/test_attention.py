"""Fast attention paths against the materialised-softmax reference, forward and backward, odd lengths."""

import pytest
import torch

from archs.ops.attention import attention_chunked, attention_math, attention_sdpa
from archs.positions import alibi_slopes

LENGTHS = [1, 7, 63, 257]


def qkv(t: int, h: int = 4, hkv: int = 4, hd: int = 16, b: int = 2, tq: int | None = None):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, h, tq or t, hd, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, t, hd, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, t, hd, generator=g, requires_grad=True)
    return q, k, v


def fwd_bwd(fn, q, k, v, **kw):
    for t in (q, k, v):
        t.grad = None
    y = fn(q, k, v, **kw)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [t.grad.clone() for t in (q, k, v)]


def assert_parity(fast, ref, q, k, v, **kw):
    y1, g1 = fwd_bwd(fast, q, k, v, **kw)
    y0, g0 = fwd_bwd(attention_math, q, k, v, **kw)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b, n in zip(g1, g0, "qkv", strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"grad {n}: {s}")


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("fast", [attention_sdpa, attention_chunked], ids=["sdpa", "chunked"])
def test_causal_parity(fast, t):
    kw = {"chunk_size": 16} if fast is attention_chunked else {}
    assert_parity(lambda *a, **k: fast(*a, **k, **kw), attention_math, *qkv(t))


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("fast", [attention_sdpa, attention_chunked], ids=["sdpa", "chunked"])
def test_window_parity(fast, t):
    kw = {"chunk_size": 16} if fast is attention_chunked else {}
    assert_parity(lambda *a, **k: fast(*a, **k, **kw), attention_math, *qkv(t), window=5)


@pytest.mark.parametrize("fast", [attention_sdpa, attention_chunked], ids=["sdpa", "chunked"])
def test_alibi_and_gqa_parity(fast):
    q, k, v = qkv(63, h=4, hkv=2)
    assert_parity(fast, attention_math, q, k, v, alibi=alibi_slopes(4))


def test_decoding_alignment_is_bottom_right():
    """A query block after cached keys sees every cached key and the new keys up to itself."""
    q, k, v = qkv(20, tq=3)
    for fn in (attention_sdpa, attention_chunked):
        torch.testing.assert_close(fn(q, k, v), attention_math(q, k, v), rtol=1e-4, atol=1e-5)
    # the last query of the block sees all 20 keys: equal to unmasked attention for that row
    full = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(attention_math(q, k, v)[:, :, -1:], full, rtol=1e-5, atol=1e-6)


def test_window_of_one_is_identity_on_values():
    q, k, v = qkv(9)
    torch.testing.assert_close(attention_math(q, k, v, window=1), v, rtol=1e-6, atol=1e-6)


def test_alibi_slopes_match_the_paper():
    # power of two: 2^(-8/H * i); otherwise the closest power of two plus every other slope of 2x that
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s6 = alibi_slopes(6)
    assert torch.allclose(s6[:4], torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    assert torch.allclose(s6[4:], torch.tensor([2.0 ** -1, 2.0 ** -3]))


@pytest.mark.parametrize("kw", [{"alibi": alibi_slopes(4)}, {"window": 5}, {"alibi": alibi_slopes(4), "window": 9}],
                         ids=["alibi", "window", "alibi+window"])
@pytest.mark.parametrize("tq", [None, 5], ids=["full", "prefill"])
def test_masked_sdpa_in_row_blocks_is_exact(monkeypatch, kw, tq):
    """Masked SDPA calls (ALiBi, windows) run in blocks of query rows once the scores would be large; the
    blocks (several, uneven, recomputed in backward) give the reference's outputs and gradients."""
    import archs.ops.attention as ops

    q, k, v = qkv(37, h=4, hkv=2, tq=tq)
    monkeypatch.setattr(ops, "MASKED_SCORES", 2 * 4 * 37 * 3)  # 3 query rows per block
    calls = []
    real = ops._sdpa_masked
    monkeypatch.setattr(ops, "_sdpa_masked", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    assert_parity(attention_sdpa, attention_math, q, k, v, **kw)
    assert max(calls) == 3 and len(calls) >= 2 * ((tq or 37) + 2) // 3  # blocked, forward and recompute


@pytest.mark.parametrize("kw", [{"alibi": alibi_slopes(4)}, {"window": 5}], ids=["alibi", "window"])
def test_masked_sdpa_reaches_the_flash_kernel_on_cpu(kw):
    """A (H, T, T) mask sends torch's CPU SDPA to its math path (2-3x slower, (B, H, T, T) scores held twice);
    the masks we build reach the flash kernel, forward and backward."""
    from torch.profiler import profile

    q, k, v = qkv(37)
    with profile() as prof:
        attention_sdpa(q, k, v, **kw).sum().backward()
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_masked_sdpa_memory_is_linear_in_length():
    """ALiBi at T=4096, batch 4: one masked call would hold 2 x 1 GiB of scores; the blocks stay far below."""
    import subprocess
    import sys

    code = ("import resource, torch\n"
            "from archs.ops.attention import attention_sdpa\nfrom archs.positions import alibi_slopes\n"
            "torch.set_num_threads(1)\nq = torch.randn(4, 4, 4096, 16)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with torch.no_grad():\n    attention_sdpa(q, q, q, alibi=alibi_slopes(4))\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 700, f"peak {out.stdout.strip()} MiB above baseline"
