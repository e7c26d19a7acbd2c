"""The native Hugging Face classes a mixerlab model can be exactly, and the weights' mapping both ways.

- pure ``mamba`` (no MLP, RMSNorm, no positions, no short conv, no biases) is `MambaForCausalLM`;
- pure ``mamba2`` (the same, with mamba-ssm's gated RMSNorm after the gate) is `Mamba2ForCausalLM`;
- pure ``attention`` with RoPE, SwiGLU, RMSNorm and no biases is `LlamaForCausalLM`.

`native_for(spec)` says which one, or why none (the first property that differs); `to_native` and
`from_native` move a state dict across; `spec_from_config` reads a native config back into a `ModelSpec`,
refusing — with the field named — what mixerlab cannot represent; `load_native` (`LanguageModel.from_hf`)
builds our model from a local checkpoint directory. Nothing here imports transformers: a native checkpoint is
its ``config.json`` and its safetensors. The parameter names of our Mamba and
Mamba-2 mixers are mamba-ssm's, which are also transformers', so the mapping is mostly a prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from archs.mlp import mlp_hidden
from archs.model import LanguageModel, ModelSpec, SpecError

__all__ = ["NATIVE", "Native", "native_for", "spec_from_config", "from_native", "to_native", "load_hf_state",
           "load_native"]

NORM_EPS = 1e-5  # every mixerlab norm's epsilon (archs.norms.make_norm)
NATIVE = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class Native:
    """A native class for a spec: transformers' ``model_type``, the architecture and the config's fields."""

    model_type: str
    config: dict[str, Any]
    reason: str

    @property
    def architecture(self) -> str:
        return NATIVE[self.model_type]


def _common(spec: ModelSpec, mlp: str, positions: str) -> str | None:
    """Why the model around the mixers is not the native one's, or None."""
    checks = [(spec.norm == "rmsnorm", f"norm={spec.norm!r} (native: rmsnorm)"),
              (spec.mlp == mlp, f"mlp={spec.mlp!r} (native: {mlp!r})"),
              (spec.positions == positions, f"positions={spec.positions!r} (native: {positions!r})"),
              (spec.short_conv == 0, f"short_conv={spec.short_conv} (native: none)"),
              (not spec.bias, "bias=True (native: no biases in norms and MLPs)")]
    return next((why for ok, why in checks if not ok), None)


def native_for(model: Any) -> tuple[Native | None, str]:
    """The native class ``model`` (a `LanguageModel`) is exactly, and why; or None and why not."""
    spec: ModelSpec = model.spec
    mixers = sorted({layer.mixer for layer in spec.resolved_layers})
    base = {"vocab_size": spec.vocab_size, "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers,
            "tie_word_embeddings": spec.tie_embeddings}
    if mixers == ["mamba"]:
        why = _common(spec, "none", "none")
        m = model.blocks[0].mixer
        if why is None:
            return Native("mamba", {**base, "state_size": m.d_state, "conv_kernel": m.d_conv,
                                    "expand": m.d_inner // spec.d_model, "intermediate_size": m.d_inner,
                                    "time_step_rank": m.dt_rank, "use_bias": m.opts.bias,
                                    "use_conv_bias": m.opts.conv_bias,
                                    "layer_norm_epsilon": NORM_EPS, "residual_in_fp32": True},
                          "every layer is mamba, with no MLP, RMSNorm, no positions: Mamba-1's own model"), ""
        return None, f"every layer is mamba, but {why}"
    if mixers == ["mamba2"]:
        why = _common(spec, "none", "none")
        m = model.blocks[0].mixer
        o = m.opts
        if why is None:
            why = next((w for ok, w in [
                (o.d_ssm is None or o.d_ssm == m.d_inner, f"mamba2 d_ssm={o.d_ssm} (an MLP part beside the SSM)"),
                (o.rmsnorm and not o.norm_before_gate, "mamba2 rmsnorm=False or norm_before_gate=True"),
                (not o.D_has_hdim, "mamba2 D_has_hdim=True"),
                (m.d_inner % spec.d_model == 0, f"mamba2 expand={o.expand} is not an integer")] if not ok), None)
        if why is None:
            return Native("mamba2", {**base, "state_size": o.d_state, "conv_kernel": o.d_conv,
                                     "expand": m.d_inner // spec.d_model, "head_dim": o.headdim,
                                     "num_heads": m.d_inner // o.headdim, "n_groups": o.ngroups,
                                     "chunk_size": o.chunk_size, "use_bias": o.bias, "use_conv_bias": o.conv_bias,
                                     "time_step_limit": list(o.dt_limit), "rms_norm": True,
                                     "layer_norm_epsilon": NORM_EPS, "residual_in_fp32": True},
                          "every layer is mamba2, with no MLP, RMSNorm, no positions: Mamba-2's own model"), ""
        return None, f"every layer is mamba2, but {why}"
    if mixers == ["attention"]:
        why = _common(spec, "swiglu", "rope")
        m = model.blocks[0].mixer
        if why is None and m.opts.bias:
            why = "attention bias=True"
        if why is None:
            hidden = model.blocks[0].mlp.fc_out.weight.shape[1]
            return Native("llama", {**base, "intermediate_size": hidden, "num_attention_heads": m.n_heads,
                                    "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
                                    "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": NORM_EPS,
                                    "rope_theta": m.opts.rope_base, "hidden_act": "silu", "attention_bias": False,
                                    "mlp_bias": False},
                          "every layer is attention with RoPE and SwiGLU, RMSNorm, no biases: a Llama"), ""
        return None, f"every layer is attention, but {why}"
    return None, f"its layers are {', '.join(mixers)}: no transformers class has them"


# weights ----------------------------------------------------------------------------------------------------
def _llama_layer(i: int) -> dict[str, str]:
    p, q = f"blocks.{i}.", f"model.layers.{i}."
    return {p + "norm1.weight": q + "input_layernorm.weight",
            p + "norm2.weight": q + "post_attention_layernorm.weight",
            p + "mixer.out_proj.weight": q + "self_attn.o_proj.weight",
            p + "mlp.fc_out.weight": q + "mlp.down_proj.weight"}


def to_native(native: Native, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """mixerlab's state dict under transformers' names (fused projections split)."""
    out: dict[str, Tensor] = {}
    if native.model_type in ("mamba", "mamba2"):
        for name, t in state.items():
            if name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                rest = "norm.weight" if rest == "norm1.weight" else rest
                out[f"backbone.layers.{i}.{rest}"] = t
            elif name == "embed.weight":
                out["backbone.embeddings.weight"] = t
            elif name == "norm_f.weight":
                out["backbone.norm_f.weight"] = t
            else:
                out[name] = t  # lm_head.weight
        return out
    c = native.config
    hd, h, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    for i in range(c["num_hidden_layers"]):
        for ours, theirs in _llama_layer(i).items():
            out[theirs] = state[ours]
        q, k, v = state[f"blocks.{i}.mixer.wqkv.weight"].split([h * hd, hkv * hd, hkv * hd])
        out.update({f"model.layers.{i}.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v), strict=True)})
        gate, up = state[f"blocks.{i}.mlp.fc_in.weight"].chunk(2)
        out[f"model.layers.{i}.mlp.gate_proj.weight"], out[f"model.layers.{i}.mlp.up_proj.weight"] = gate, up
    out["model.embed_tokens.weight"], out["model.norm.weight"] = state["embed.weight"], state["norm_f.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    return out


def from_native(native: Native, theirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers state dict under mixerlab's names (the inverse of `to_native`)."""
    if native.model_type in ("mamba", "mamba2"):
        out = {}
        for name, t in theirs.items():
            if name.startswith("backbone.layers."):
                _, _, i, rest = name.split(".", 3)
                out[f"blocks.{i}.{'norm1.weight' if rest == 'norm.weight' else rest}"] = t
            elif name == "backbone.embeddings.weight":
                out["embed.weight"] = t
            elif name == "backbone.norm_f.weight":
                out["norm_f.weight"] = t
            else:
                out[name] = t
        out.setdefault("lm_head.weight", out["embed.weight"])
        return out
    out = {}
    for i in range(native.config["num_hidden_layers"]):
        for ours, name in _llama_layer(i).items():
            out[ours] = theirs[name]
        a = f"model.layers.{i}."
        out[f"blocks.{i}.mixer.wqkv.weight"] = torch.cat([theirs[a + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"blocks.{i}.mlp.fc_in.weight"] = torch.cat([theirs[a + "mlp.gate_proj.weight"],
                                                         theirs[a + "mlp.up_proj.weight"]])
    out["embed.weight"], out["norm_f.weight"] = theirs["model.embed_tokens.weight"], theirs["model.norm.weight"]
    out["lm_head.weight"] = theirs.get("lm_head.weight", out["embed.weight"])
    return out


# configs ----------------------------------------------------------------------------------------------------
def _refuse(model_type: str, field: str, value: Any, why: str) -> SpecError:
    return SpecError(f"config.json {field}={value!r}: {why}; mixerlab cannot represent this {NATIVE[model_type]} "
                      f"(nothing was written)")


def _number(value: Any) -> float:
    """A float as config.json holds it (transformers writes infinity as ``{"__float__": "Infinity"}``)."""
    return float(value["__float__"] if isinstance(value, dict) and "__float__" in value else value)


def spec_from_config(config: dict[str, Any]) -> tuple[ModelSpec, Native]:
    """The `ModelSpec` of a native transformers config (its ``config.json``), or a `SpecError` naming the
    field mixerlab cannot represent."""
    kind = config.get("model_type")
    if kind not in NATIVE:
        raise SpecError(f"config.json model_type={kind!r}: mixerlab imports {', '.join(NATIVE.values())} "
                         f"(model_type {', '.join(map(repr, NATIVE))}); export other models from their own tools")
    eps_field = "rms_norm_eps" if kind == "llama" else "layer_norm_epsilon"
    eps = config.get(eps_field, NORM_EPS)
    if not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
        raise _refuse(kind, eps_field, eps, f"mixerlab's norms use epsilon {NORM_EPS}")
    base = {"vocab_size": config["vocab_size"], "d_model": config["hidden_size"],
            "n_layers": config["num_hidden_layers"], "norm": "rmsnorm", "bias": False,
            "tie_embeddings": bool(config.get("tie_word_embeddings", True))}
    if kind == "mamba":
        d = config["hidden_size"]
        expand = config.get("intermediate_size", d * config.get("expand", 2)) / d
        options = {"d_state": config.get("state_size", 16), "d_conv": config.get("conv_kernel", 4), "expand": expand,
                   "dt_rank": config.get("time_step_rank", "auto"), "bias": bool(config.get("use_bias", False)),
                   "conv_bias": bool(config.get("use_conv_bias", True))}
        if options["dt_rank"] == "auto":
            options["dt_rank"] = math.ceil(config["hidden_size"] / 16)
        spec = ModelSpec.from_dict({**base, "mixer": "mamba", "mlp": "none", "positions": "none",
                                    "mixer_options": {"mamba": options}})
    elif kind == "mamba2":
        if not config.get("rms_norm", True):
            raise _refuse(kind, "rms_norm", False, "mixerlab's Mamba-2 has the gated RMSNorm")
        d_inner = int(config.get("expand", 2) * config["hidden_size"])
        if config["num_heads"] * config["head_dim"] != d_inner:
            raise _refuse(kind, "num_heads", config["num_heads"],
                          f"num_heads x head_dim must be expand x hidden_size = {d_inner}")
        limit = config.get("time_step_limit", (0.0, float("inf")))
        options = {"d_state": config.get("state_size", 128), "d_conv": config.get("conv_kernel", 4),
                   "expand": config.get("expand", 2), "headdim": config["head_dim"],
                   "ngroups": config.get("n_groups", 1), "chunk_size": config.get("chunk_size", 256),
                   "bias": bool(config.get("use_bias", False)), "conv_bias": bool(config.get("use_conv_bias", True)),
                   "dt_limit": [_number(x) for x in limit]}
        spec = ModelSpec.from_dict({**base, "mixer": "mamba2", "mlp": "none", "positions": "none",
                                    "mixer_options": {"mamba2": options}})
    else:
        for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if config.get(field, want) != want:
                raise _refuse(kind, field, config.get(field), f"mixerlab's Llama-style model has {field}={want!r}")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _refuse(kind, "rope_parameters.rope_type", rope.get("rope_type"), "only plain RoPE is supported")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        inter, d = config["intermediate_size"], config["hidden_size"]
        ratio = next((r for r in (inter * 3 / (2 * d), inter * 3 / (2 * d) * (1 - 1e-12))
                      if mlp_hidden("swiglu", d, r) == inter), None)
        if ratio is None:
            raise _refuse(kind, "intermediate_size", inter, "mixerlab's SwiGLU width is a multiple of 8")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        spec = ModelSpec.from_dict({**base, "mixer": "attention", "mlp": "swiglu", "positions": "rope",
                                    "n_heads": heads, "mlp_ratio": ratio,
                                    "max_seq_len": config.get("max_position_embeddings", 2048),
                                    "mixer_options": {"attention": {
                                        "n_kv_heads": config.get("num_key_value_heads") or heads,
                                        "head_dim": head_dim, "rope_base": float(theta)}}})
    return spec, Native(kind, dict(config), f"imported from {NATIVE[kind]}")


# checkpoints ------------------------------------------------------------------------------------------------
def load_hf_state(src: str | Path) -> dict[str, Tensor]:
    """The weights of a local transformers directory: ``model.safetensors`` (or its shards), else
    ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    src = Path(src)
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(src / f).items()}
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise SpecError(f"{src} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_native(src_dir: str | Path) -> tuple[LanguageModel, Native]:
    """Our model of a local native transformers directory (``config.json`` + weights), and what it was;
    a config mixerlab cannot represent is refused naming the field."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise SpecError(f"{src} has no config.json: pass a Hugging Face model directory")
    spec, native = spec_from_config(json.loads((src / "config.json").read_text()))
    model = LanguageModel(spec)
    state = from_native(native, load_hf_state(src))
    if spec.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SpecError(f"{src}: weights do not fit the {NATIVE[native.model_type]} config (missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}); is config.json the one they came with?")
    return model, native
