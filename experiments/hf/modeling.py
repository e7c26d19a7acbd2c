"""`MixerlabForCausalLM`: any mixerlab model as a Hugging Face causal LM (`from_pretrained`, `generate`,
lm-evaluation-harness), for the models no native transformers class is — hybrids, plugins, the linear
attention, long-convolution and RG-LRU families.

`MixerlabConfig` holds the `ModelSpec`; the model wraps `LanguageModel` unchanged (its weights under
``model.``). `generate` decodes with the mixers' own caches (a KV cache for attention, conv and SSM states
for Mamba, recurrent states for the linear-attention family): the first call runs the prompt, every next
one only the new token. Importing this module registers both with `AutoConfig` and `AutoModelForCausalLM`;
an exported directory also reaches them through ``auto_map`` with ``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from archs.model import LanguageModel, ModelCache, ModelSpec

__all__ = ["MixerlabCausalLMOutput", "MixerlabConfig", "MixerlabForCausalLM"]


class MixerlabConfig(PretrainedConfig):
    """A mixerlab `ModelSpec` (``spec``, its ``to_dict``) as a transformers config."""

    model_type = "mixerlab"

    def __init__(self, spec: dict[str, Any] | None = None, **kwargs: Any):
        self.spec = dict(spec or {})
        if self.spec:
            parsed = ModelSpec.from_dict(self.spec)
            kwargs.setdefault("vocab_size", parsed.vocab_size)
            kwargs.setdefault("hidden_size", parsed.d_model)
            kwargs.setdefault("num_hidden_layers", parsed.n_layers)
            kwargs.setdefault("tie_word_embeddings", parsed.tie_embeddings)
        super().__init__(**kwargs)


@dataclass
class MixerlabCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mixerlab_cache: ModelCache | None = None


class MixerlabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MixerlabConfig
    base_model_prefix = "mixerlab"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MixerlabConfig):
        super().__init__(config)
        self.model = LanguageModel(ModelSpec.from_dict(config.spec))
        if not self.model.spec.tie_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    def _init_weights(self, module: Any) -> None:
        """Nothing: `LanguageModel` and its mixers initialise themselves (and a load overwrites it all)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> MixerlabForCausalLM:
        """transformers' loading, then the buffers no checkpoint holds (RoPE frequencies, ALiBi slopes,
        decay tables: non-persistent) computed again — transformers builds the model on the meta device."""
        model = super().from_pretrained(*args, **kwargs)
        fresh = dict(LanguageModel(model.model.spec).named_buffers())
        saved = set(model.model.state_dict())
        for name, buffer in list(model.model.named_buffers()):
            if name not in saved:
                owner, _, leaf = name.rpartition(".")
                target = model.model.get_submodule(owner) if owner else model.model
                target.register_buffer(leaf, fresh[name].to(device=buffer.device), persistent=False)
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the mixers keep their own caches

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, mixerlab_cache: ModelCache | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> MixerlabCausalLMOutput:
        """Logits of ``input_ids``; with ``labels``, the mean next-token loss (labels shifted inside, -100
        ignored, as transformers' causal LMs do). ``use_cache``: continue from / return ``mixerlab_cache``."""
        if attention_mask is not None:
            mask = attention_mask.bool()
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):  # a 0 before a 1: left padding
                raise ValueError("MixerlabForCausalLM does not take left-padded batches (mixers have no padding "
                                 "mask); pad on the right (tokenizer.padding_side = 'right') or run one sequence "
                                 "at a time")
        if use_cache:
            if mixerlab_cache is None:
                mixerlab_cache = self.model.init_cache(input_ids.shape[0], input_ids.shape[1])
            logits = self.model(input_ids, mixerlab_cache)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return MixerlabCausalLMOutput(loss=loss, logits=logits, mixerlab_cache=mixerlab_cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, mixerlab_cache: ModelCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict[str, Any]:
        if mixerlab_cache is not None:  # only the tokens the cache has not seen
            input_ids = input_ids[:, mixerlab_cache.length:]
        return {"input_ids": input_ids, "mixerlab_cache": mixerlab_cache, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any],
                                            *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["mixerlab_cache"] = outputs.get("mixerlab_cache")
        return model_kwargs


AutoConfig.register("mixerlab", MixerlabConfig, exist_ok=True)
AutoModelForCausalLM.register(MixerlabConfig, MixerlabForCausalLM, exist_ok=True)
