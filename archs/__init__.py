"""mixerlab's models: mixers, blocks and language models. Knows nothing of Optuna or experiments."""
