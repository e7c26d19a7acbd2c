"""Hugging Face interoperability: export a run as a transformers model directory (a native class where the
model is one, `MixerlabForCausalLM` otherwise), import native Mamba / Mamba-2 / Llama checkpoints, the byte
tokenizer as a transformers tokenizer. Needs ``transformers`` (the ``hf`` extra)."""
