"""Language models built from a `ModelSpec`: embedding -> (positions) -> blocks -> final norm -> LM head.

The spec is a frozen, JSON-serialisable dataclass validated when it is built, so a bad value fails before
any parameter is allocated. Its layers come from one mixer name, a tiled pattern with a legend, an
attention ratio, or an explicit list (see `archs.pattern`); the resolved per-layer list is part of the spec.

Model-level knobs reach the mixers that declare them as options: ``n_heads``, and ``positions`` when it is
``rope`` or ``alibi`` (applied inside attention). ``learned`` positions are added to the embeddings and
have a hard ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archs.block import Block, BlockCache
from archs.mixers.base import Mixer
from archs.mlp import MLPS
from archs.norms import NORMS, make_norm
from archs.pattern import LayerSpec, PatternError, pattern_of, ratio_placement, resolve_legend, tile_pattern
from archs.positions import POSITIONS, LearnedPositions
from registry import MIXERS, MixerlabError, check_fields, check_types

__all__ = ["PRESETS", "LanguageModel", "ModelCache", "ModelSpec", "SpecError"]


class SpecError(MixerlabError, ValueError):
    """An invalid model spec; the message names the field and the fix."""


def layers_text(pattern: str, mixers: list[str]) -> str:
    """``pattern`` unless a layer has no legend letter (``?``); then the layers' mixer names."""
    if "?" not in pattern or not mixers:
        return pattern
    return f"{len(mixers)} × {mixers[0]}" if len(set(mixers)) == 1 else ", ".join(mixers)


def _canon(obj: Any) -> Any:
    """The JSON form of an options value (tuples become lists), so specs compare equal after a round trip."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a `LanguageModel`. Round-trips through JSON (`to_json` / `from_json`)."""

    vocab_size: int = 260
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mixer: str = "attention"  # every layer's mixer, unless pattern / attn_ratio / layers is given
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # mixer name -> options
    pattern: str | None = None  # tiled over n_layers, letters from the legend
    legend: dict[str, Any] = field(default_factory=dict)  # letter -> name | {"mixer", "options"}
    attn_ratio: float | None = None  # round(n_layers * ratio) layers of attn_mixer, evenly placed
    attn_mixer: str = "attention"
    layers: list[Any] | None = None  # explicit per-layer names or {"mixer", "options"}
    positions: str = "rope"  # learned | rope | alibi | none
    max_seq_len: int = 1024  # hard limit for learned positions; the default cache size otherwise
    mlp: str = "swiglu"  # none | gelu | swiglu
    mlp_ratio: float = 4.0
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    short_conv: int = 0  # kernel of the short causal conv before each mixer; 0 = off
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False  # biases in MLPs and LayerNorms

    def __post_init__(self) -> None:
        check_types("ModelSpec", self, SpecError)
        object.__setattr__(self, "mixer_options", _canon(self.mixer_options))
        object.__setattr__(self, "legend", _canon(self.legend))
        if self.layers is not None:
            object.__setattr__(self, "layers", _canon(list(self.layers)))
        self._validate()
        object.__setattr__(self, "_resolved", self._resolve())

    # validation ------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise SpecError(f"ModelSpec.{name}={getattr(self, name)!r}: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "short_conv"):
            need(getattr(self, name) < 2**31, name, "must be below 2^31 (no tensor that size can be built)")
        need(math.isfinite(self.mlp_ratio) and self.mlp_ratio * self.d_model < 2**31, "mlp_ratio",
             "must be a positive number with mlp_ratio * d_model below 2^31")
        need(self.positions in POSITIONS, "positions", f"must be one of {POSITIONS}")
        need(self.mlp in MLPS, "mlp", f"must be one of {MLPS}")
        need(self.norm in NORMS, "norm", f"must be one of {NORMS}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        need(isinstance(self.short_conv, int) and self.short_conv >= 0, "short_conv",
             "must be 0 (off) or a kernel size >= 2")
        need(self.short_conv != 1, "short_conv", "a kernel of 1 is not a convolution over time; use 0 or >= 2")
        need(isinstance(self.mixer_options, dict) and all(isinstance(v, dict) for v in self.mixer_options.values()),
             "mixer_options", "must map mixer names to option tables, e.g. {'mamba': {'d_state': 16}}")
        given = [n for n in ("pattern", "attn_ratio", "layers") if getattr(self, n) is not None]
        need(len(given) <= 1, given[-1] if given else "pattern",
             f"give at most one of pattern, attn_ratio and layers (got {', '.join(given)})")

    def _resolve(self) -> tuple[LayerSpec, ...]:
        try:
            if self.pattern is not None:
                legend = resolve_legend(self.legend)
                tiled = tile_pattern(self.pattern, self.n_layers)
                bad = sorted(set(tiled) - set(legend))
                if bad:
                    raise PatternError(
                        f"pattern {self.pattern!r} uses letter(s) {', '.join(map(repr, bad))} that the legend "
                        f"lacks; known letters: {', '.join(f'{k}={v.mixer}' for k, v in legend.items())}. "
                        f"Add them with legend={{'{bad[0]}': 'mixer_name'}}"
                    )
                base = [legend[c] for c in tiled]
            elif self.attn_ratio is not None:
                flags = ratio_placement(self.n_layers, self.attn_ratio)
                base = [LayerSpec(self.attn_mixer if f else self.mixer) for f in flags]
            elif self.layers is not None:
                if len(self.layers) != self.n_layers:
                    raise PatternError(f"layers lists {len(self.layers)} mixers but n_layers={self.n_layers}")
                base = [LayerSpec.parse(item, f"layers[{i}]") for i, item in enumerate(self.layers)]
            else:
                base = [LayerSpec(self.mixer)] * self.n_layers
        except PatternError as exc:
            raise SpecError(str(exc)) from None
        unused = set(self.mixer_options) - {layer.mixer for layer in base}
        if unused:
            raise SpecError(f"mixer_options names {', '.join(sorted(unused))}, but no layer uses "
                            f"{'it' if len(unused) == 1 else 'them'}; layers use {sorted({b.mixer for b in base})}")
        resolved = []
        for i, layer in enumerate(base):
            options = {**self.mixer_options.get(layer.mixer, {}), **layer.options}
            try:
                accepted = {o.name for o in MIXERS.options(layer.mixer)}
            except (KeyError, ValueError) as exc:
                raise SpecError(f"layer {i}: {exc}") from None
            if "n_heads" in accepted and "n_heads" not in options:
                options["n_heads"] = self.n_heads
            if "positions" in accepted and "positions" not in options:
                options["positions"] = self.positions if self.positions in ("rope", "alibi") else "none"
            try:
                MIXERS.validate_options(layer.mixer, options)
            except (KeyError, ValueError) as exc:
                raise SpecError(f"layer {i} ({layer.mixer}): {exc}") from None
            resolved.append(LayerSpec(layer.mixer, _canon(options)))
        return tuple(resolved)

    # views -----------------------------------------------------------------------------------------------
    @property
    def resolved_layers(self) -> tuple[LayerSpec, ...]:
        """Each layer's mixer and its full options, as built."""
        return self._resolved  # type: ignore[attr-defined]

    @property
    def layer_pattern(self) -> str:
        """The layers as a pattern string over the legend (e.g. ``"MMMAMMMA"``)."""
        return pattern_of(list(self.resolved_layers), self.legend)

    @property
    def layers_text(self) -> str:
        """The layers for a reader: the pattern (``MMMA``), or where a layer's mixer has no legend letter (a
        plugin) their names (``2 × toymix``; ``toymix, attention``)."""
        return layers_text(self.layer_pattern, [layer.mixer for layer in self.resolved_layers])

    def check_builds(self) -> int:
        """Build the model once on the meta device (no memory, no data), so that a constraint between fields
        that only a mixer checks (heads dividing width, a window against a length, ...) fails now, as a
        `SpecError` naming the layer; return the parameter count (tied weights once)."""
        import torch

        try:
            with torch.device("meta"):
                model = LanguageModel(self)
        except MixerlabError:
            raise
        except Exception as exc:  # e.g. sizes whose tensors cannot exist at all
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SpecError(f"ModelSpec (d_model={self.d_model}, n_layers={self.n_layers}, "
                            f"vocab_size={self.vocab_size}) does not build: {type(exc).__name__}: {first}") from exc
        return model.num_params()

    @property
    def length_limit(self) -> int | None:
        """The longest input this model can run: ``max_seq_len`` with learned positions, else None (no limit)."""
        return self.max_seq_len if self.positions == "learned" else None

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    # serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["resolved_layers"] = [layer.to_dict() for layer in self.resolved_layers]
        return _canon(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        recorded = data.pop("resolved_layers", None)
        check_fields("ModelSpec", data, [f.name for f in dataclasses.fields(cls)], SpecError)
        spec = cls(**data)
        if recorded is not None and [layer.to_dict() for layer in spec.resolved_layers] != recorded:
            raise SpecError("the recorded resolved_layers differ from what this spec resolves to now "
                            "(a mixer's default options changed?); drop resolved_layers to accept the new ones")
        return spec

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelSpec:
        """A named preset (see `PRESETS`) with ``overrides`` applied."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=2)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise SpecError(f"unknown preset {name!r}; {hint}presets: {', '.join(PRESETS)}")
        check_fields("ModelSpec", overrides, [f.name for f in dataclasses.fields(cls)], SpecError)
        return cls(**{**PRESETS[name], **overrides})


#: Named small models. Override any field: ``ModelSpec.from_preset("jamba", d_model=256)``.
PRESETS: dict[str, dict[str, Any]] = {
    # the classic GPT of the course chapter: token + learned absolute positions, attention, GELU MLP,
    # LayerNorm, LM head without bias (tied to the embedding)
    "classic-transformer": dict(mixer="attention", positions="learned", mlp="gelu", norm="layernorm",
                                max_seq_len=256, d_model=128, n_layers=4, n_heads=4),
    # a modern transformer: RoPE, SwiGLU, RMSNorm
    "transformer": dict(mixer="attention", positions="rope", mlp="swiglu", d_model=128, n_layers=4, n_heads=4),
    # Mamba paper: homogeneous Mamba blocks, no MLP, no positions, twice the layers of a transformer
    "mamba": dict(mixer="mamba", positions="none", mlp="none", d_model=128, n_layers=8),
    "mamba2": dict(mixer="mamba2", positions="none", mlp="none", d_model=128, n_layers=8,
                   mixer_options={"mamba2": {"d_state": 64, "headdim": 32}}),
    # Jamba (Lieber et al. 2024): one attention layer in eight (at i % 8 == 4), no explicit positions
    "jamba": dict(pattern="MMMMAMMM", n_layers=8, positions="none", d_model=128, n_heads=4),
    # NVIDIA's 8B Mamba-2 hybrid (Waleffe et al. 2024): of 56 sub-layers 24 Mamba-2, 4 attention, 28 MLP.
    # Here every block is mixer + MLP, so 2 attention blocks of 14 (1/7 of mixers, 7% of sub-layers).
    "nvidia-hybrid": dict(mixer="mamba2", attn_ratio=1 / 7, n_layers=14, positions="none", d_model=128,
                          n_heads=4, mixer_options={"mamba2": {"d_state": 64, "headdim": 32}}),
    # a small hybrid for quick comparisons
    "hybrid": dict(pattern="MMMA", n_layers=4, positions="none", d_model=128, n_heads=4),
}


class ModelCache:
    """Decoding state of a whole model: one `BlockCache` per layer, any mix of attention and SSM layers."""

    def __init__(self, layers: list[BlockCache]):
        self.layers = layers
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class LanguageModel(nn.Module):
    """A causal language model over a `ModelSpec`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.pos = LearnedPositions(spec.max_seq_len, d) if spec.positions == "learned" else None
        self.drop = nn.Dropout(spec.dropout)
        blocks = []
        for i, layer in enumerate(spec.resolved_layers):
            try:
                mixer = MIXERS.create(layer.mixer, d_model=d, layer_idx=i, **layer.options)
            except MixerlabError:
                raise
            except Exception as exc:  # a constraint between fields only the mixer knows (heads dividing width)
                raise SpecError(f"layer {i} ({layer.mixer}, d_model={d}"
                                + "".join(f", {k}={v!r}" for k, v in layer.options.items())
                                + f") does not build: {(str(exc).strip().splitlines() or [''])[0]}") from exc
            if not isinstance(mixer, Mixer):
                raise TypeError(f"mixer {layer.mixer!r} built a {type(mixer).__name__}, not an "
                                f"archs.mixers.Mixer subclass; subclass Mixer (implement __init__ and forward)")
            blocks.append(Block(mixer, d, norm=spec.norm, mlp=spec.mlp, mlp_ratio=spec.mlp_ratio,
                                short_conv=spec.short_conv, dropout=spec.dropout, bias=spec.bias))
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = make_norm(spec.norm, d, bias=spec.bias)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        self._init_weights()
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """GPT-2 style init for what the model owns; mixers keep their own initialisation."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.blocks:
            if block.mlp is not None:
                nn.init.normal_(block.mlp.fc_in.weight, std=0.02)
                nn.init.normal_(block.mlp.fc_out.weight, std=0.02 / math.sqrt(2 * self.spec.n_layers))
                for lin in (block.mlp.fc_in, block.mlp.fc_out):
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)

    # forward ---------------------------------------------------------------------------------------------
    def hidden(self, ids: Tensor, cache: ModelCache | None = None) -> Tensor:
        """Final-norm hidden states ``(B, T, D)`` for token ids ``(B, T)``; with a cache, continue from it."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        offset = 0 if cache is None else cache.length
        x = self.embed(ids)  # (B, T, D)
        if self.pos is not None:
            x = x + self.pos(ids.shape[1], offset)
        x = self.drop(x)
        if cache is None:
            for block in self.blocks:
                x = block(x)
        else:
            for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
                x = block.step(x, layer_cache)
            cache.length += ids.shape[1]
        return self.norm_f(x)

    def forward(self, ids: Tensor, cache: ModelCache | None = None) -> Tensor:
        """Logits ``(B, T, V)``."""
        return self.lm_head(self.hidden(ids, cache))

    def loss(self, ids: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
        """Cross-entropy over the positions whose target is not ``ignore_index`` (their mean, or with
        ``reduction="sum"`` their sum); logits are computed only there."""
        h = self.hidden(ids)
        keep = targets != ignore_index
        if bool(keep.all()):
            return F.cross_entropy(self.lm_head(h).flatten(0, 1), targets.flatten(), reduction=reduction)
        return F.cross_entropy(self.lm_head(h[keep]), targets[keep], reduction=reduction)

    # decoding --------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None) -> ModelCache:
        p = self.embed.weight
        max_len = max_len or self.spec.max_seq_len
        return ModelCache([b.init_cache(batch_size, max_len, p.device, p.dtype) for b in self.blocks])

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue ``ids (B, T)`` by ``max_new_tokens`` tokens using the layers' caches. ``temperature=0``
        is greedy; otherwise sample (from the ``top_k`` most likely tokens if given)."""
        if max_new_tokens <= 0:
            return ids
        cache = self.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = self(ids, cache)[:, -1]
        out = [ids]
        for i in range(max_new_tokens):
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.shape[-1])).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(scaled.float(), -1), 1, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, cache)[:, -1]
        return torch.cat(out, dim=1)

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> LanguageModel:
        """Our model of a local Hugging Face `MambaForCausalLM`, `Mamba2ForCausalLM` or `LlamaForCausalLM`
        directory (``config.json`` + safetensors; transformers is not needed), with its weights — the same
        logits. A config mixerlab cannot represent raises `SpecError` naming the field (`archs.hf`)."""
        from archs.hf import load_native

        return load_native(path)[0]

    # costs and records -----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves out token and position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.pos is not None:
                n -= self.pos.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int | None:
        """Forward FLOPs per token at ``seq_len`` (training is ~3x). ``None`` if a mixer cannot say."""
        total = 2 * self.spec.d_model * self.spec.vocab_size  # LM head
        for block in self.blocks:
            mixer = block.mixer.flops_per_token(seq_len)
            if mixer is None:
                return None
            mlp = 0 if block.mlp is None else 2 * sum(p.numel() for p in block.mlp.parameters() if p.dim() == 2)
            conv = 0 if block.short_conv is None else 2 * self.spec.d_model * block.short_conv.kernel_size
            total += mixer + mlp + conv
        return total

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int | None:
        """Decoding-cache bytes after ``seq_len`` tokens (``None`` if a mixer cannot say)."""
        total = 0
        for block in self.blocks:
            b = block.state_bytes(seq_len, batch_size, dtype or self.embed.weight.dtype)
            if b is None:
                return None
            total += b
        return total

    def backends(self) -> dict[str, str | None]:
        """The backend each layer's mixer last ran on (record this with results). A mixer that never records
        one (a minimal plugin: ``__init__`` and ``forward``) and has one backend ran on that one (``torch``)."""
        out = {}
        for i, b in enumerate(self.blocks):
            ran, live = b.mixer.backend, [k for k, ok in b.mixer.available_backends().items() if ok == "yes"]
            out[f"{i}:{b.mixer.mixer_name}"] = ran if ran is not None or len(live) != 1 else live[0]
        return out
