"""flash-linear-attention's layers, runnable on a CPU: for the compatibility tests and the benchmarks.

fla installs on a CPU machine (``pip install --no-deps fla-core flash-linear-attention``) but its layers
launch Triton kernels. `install` replaces each kernel a layer module imported with fla's own pure-PyTorch
reference (``fla/ops/*/naive.py``: the per-token recurrences, or with ``ops="chunk"`` its naive chunked forms
where it has one) and each fused module (short convolution, gated/plain RMSNorm, rotary embedding,
activations) with a plain torch equivalent. What remains is fla's layer code: its parameters, their names,
shapes and initialisation, and its forward — what our mixers must match, and what a CPU user of fla can run.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + 1e-6).to(x)


def _heads_first(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in xs]


def _gla(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, **_: Any):
    from fla.ops.gla.naive import naive_recurrent_gla

    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)


def _retention(q, k, v, initial_state=None, output_final_state=False, **_: Any):
    from fla.ops.retention.naive import naive_retention

    assert initial_state is None
    o = naive_retention(*_heads_first(q, k, v))
    return o.transpose(1, 2), None


def _linear_attn(q, k, v, initial_state=None, output_final_state=False, normalize=False, scale=None, **_: Any):
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    return naive_recurrent_linear_attn(q, k, v, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, normalize=normalize)


def _based(q, k, v, scale=None, use_norm=True, **_: Any):
    from fla.ops.based.naive import naive_parallel_based

    return naive_parallel_based(*_heads_first(q, k, v), scale=scale, use_norm=use_norm).transpose(1, 2)


def _delta(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **_: Any):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    o, state = delta_rule_recurrence(*_heads_first(q, k, v, beta[..., None]), initial_state=initial_state,
                                     output_final_state=output_final_state)
    return o.transpose(1, 2), state


def _gated_delta_inputs(q, k, v, g, beta, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                        allow_neg_eigval=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, **_: Any):
    """What fla's gated delta-rule kernels compute before the recurrence (the options the layer passes)."""
    if use_gate_in_kernel:
        g = -A_log.float().exp() * F.softplus(g.float() + dt_bias.float())
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid()
    if allow_neg_eigval:
        beta = beta * 2
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    if v.shape[2] > q.shape[2]:  # more value heads: value head i reads query/key head i // (HV / H)
        q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for x in (q, k))
    return q, k, v, g, beta


def _gated_delta(q, k, v, g, beta, initial_state=None, output_final_state=False, **kw: Any):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    q, k, v, g, beta = _gated_delta_inputs(q, k, v, g, beta, **kw)
    return naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=initial_state,
                                            output_final_state=output_final_state)


def _delta_chunk(q, k, v, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
                 **_: Any):
    from fla.ops.delta_rule.naive import delta_rule_chunkwise

    assert initial_state is None
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    o, state = delta_rule_chunkwise(*_heads_first(q, k, v), beta.transpose(1, 2), chunk_size=32)
    return o.transpose(1, 2), state


def _gated_delta_chunk(q, k, v, g, beta, initial_state=None, output_final_state=False, **kw: Any):
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

    q, k, v, g, beta = _gated_delta_inputs(q, k, v, g, beta, **kw)
    return naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                        output_final_state=output_final_state)


def _linear_attn_chunk(q, k, v, initial_state=None, output_final_state=False, normalize=False, scale=None,
                       **_: Any):
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn

    assert initial_state is None
    return naive_chunk_linear_attn(q, k, v, scale=scale, normalize=normalize), None


def _retention_chunk(q, k, v, initial_state=None, output_final_state=False, **_: Any):
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    h = q.shape[2]
    g = torch.log1p(-(2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32))))
    return naive_chunk_simple_gla(q, k, v, g.expand(*q.shape[:2], h), initial_state=initial_state,
                                  output_final_state=output_final_state)


def _based_chunk(q, k, v, scale=None, use_norm=True, **_: Any):
    from fla.ops.based.naive import naive_chunk_based

    return naive_chunk_based(*_heads_first(q, k, v), chunk_size=64).transpose(1, 2)


def _short_conv_forward(self, x, residual=None, cache=None, output_final_state=False, cu_seqlens=None, **_: Any):
    assert cache is None and residual is None
    t = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=self.kernel_size[0] - 1,
                 groups=self.groups)[..., :t].transpose(1, 2)
    return (F.silu(y) if self.activation in ("silu", "swish") else y), None


def _causal_conv1d(x, weight, bias=None, activation=None, **_: Any):
    t = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=weight.shape[1] - 1,
                 groups=weight.shape[0])[..., :t].transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def _rms(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


def _rmsnorm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    return _rms(x, self.weight, self.eps).to(x.dtype)


def _gated_rmsnorm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    act = torch.sigmoid if self.activation == "sigmoid" else F.silu
    return (_rms(x, self.weight, self.eps) * act(g.float())).to(x.dtype)


def _rotary_forward(self, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None, **_: Any):
    from fla.modules.rotary.ops import rotary_embedding_ref

    t = q.shape[1]
    inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
    freqs = torch.outer(torch.arange(seqlen_offset, seqlen_offset + t, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return rotary_embedding_ref(q, cos, sin), rotary_embedding_ref(k, cos, sin)


_ACTIVATIONS = {"sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu, "swish": F.silu,
                "sqrelu": lambda x: F.relu(x).square(), "gelu": lambda x: F.gelu(x, approximate="tanh")}

_OPS = {
    "fla.layers.gla": {"chunk_gla": _gla, "fused_recurrent_gla": _gla, "fused_chunk_gla": _gla},
    "fla.layers.multiscale_retention": {"chunk_retention": _retention, "fused_chunk_retention": _retention,
                                        "parallel_retention": _retention, "fused_recurrent_retention": _retention},
    "fla.layers.linear_attn": {"chunk_linear_attn": _linear_attn, "fused_chunk_linear_attn": _linear_attn,
                               "fused_recurrent_linear_attn": _linear_attn},
    "fla.layers.based": {"parallel_based": _based},
    "fla.layers.delta_net": {"chunk_delta_rule": _delta, "fused_recurrent_delta_rule": _delta,
                             "elu_p1": lambda x: F.elu(x) + 1},
    "fla.layers.gated_deltanet": {"chunk_gated_delta_rule": _gated_delta,
                                  "fused_recurrent_gated_delta_rule": _gated_delta,
                                  "causal_conv1d": _causal_conv1d},
}


def install(set_attr: Callable[[Any, str, Any], None] = setattr,
            set_item: Callable[[Any, Any, Any], None] = operator.setitem, ops: str = "recurrent") -> Any:
    """Route fla's layers to pure PyTorch (through ``set_attr``/``set_item``: pytest's monkeypatch in a test,
    plain assignment in a benchmark's process); returns ``fla.layers``. ``ops``: "recurrent" (fla's per-token
    references) or "chunk" (its naive chunked forms; layers without one keep the recurrent form)."""
    import fla.layers as layers
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.activations import ACT2FN
    from fla.modules.rotary import RotaryEmbedding

    if ops not in ("recurrent", "chunk"):
        raise ValueError(f"ops must be 'recurrent' or 'chunk', got {ops!r}")
    for module_name, table in _OPS.items():
        module = importlib.import_module(module_name)
        for name, fn in {**table, **(_CHUNK_OPS.get(module_name, {}) if ops == "chunk" else {})}.items():
            if hasattr(module, name):
                set_attr(module, name, fn)
    for name, fn in _ACTIVATIONS.items():  # layers take theirs from this table when built
        set_item(ACT2FN, name, fn)
    set_attr(ShortConvolution, "forward", _short_conv_forward)
    set_attr(RMSNorm, "forward", _rmsnorm_forward)
    set_attr(FusedRMSNormGated, "forward", _gated_rmsnorm_forward)
    set_attr(RotaryEmbedding, "forward", _rotary_forward)
    return layers


#: the layers with a naive chunked form in fla 0.6, and that form
CHUNKED_LAYERS = ("DeltaNet", "GatedDeltaNet", "LinearAttention", "MultiScaleRetention", "BasedLinearAttention")

_CHUNK_OPS = {
    "fla.layers.multiscale_retention": {"chunk_retention": _retention_chunk},
    "fla.layers.linear_attn": {"chunk_linear_attn": _linear_attn_chunk},
    "fla.layers.based": {"parallel_based": _based_chunk},
    "fla.layers.delta_net": {"chunk_delta_rule": _delta_chunk},
    "fla.layers.gated_deltanet": {"chunk_gated_delta_rule": _gated_delta_chunk},
}
