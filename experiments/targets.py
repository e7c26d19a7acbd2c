"""What a measurement measures: a *target*, a JSON-ready dict that names one registered mixer layer (name,
options, ``d_model``) or a whole model (a `ModelSpec` from a preset, a spec file or a run directory).
`resolve_target` validates it before any work starts; `build_target` builds it in the measuring process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from experiments.errors import UsageError

__all__ = ["build_target", "length_limit", "resolve_target"]


def resolve_target(*, mixer: str | None = None, options: dict[str, Any] | None = None, d_model: int | None = None,
                   preset: str | None = None, spec: str | os.PathLike | dict | None = None,
                   run: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate what to measure and return it as a JSON-ready target for the child processes.

    Exactly one of ``mixer`` (a registry name, with ``options`` and ``d_model``, default 256), ``preset``
    (a named `ModelSpec` preset), ``spec`` (a ModelSpec dict or JSON file; a run's ``spec.json`` works too)
    or ``run`` (a training run directory). ``d_model`` and ``overrides`` (ModelSpec fields) apply to a
    preset or spec. Raises the registry's or the spec's error before any work is done.
    """
    given = [k for k, v in (("mixer", mixer), ("preset", preset), ("spec", spec), ("run", run)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --mixer NAME, --preset NAME, --spec FILE.json or --run DIR"
                         + (f" (got {', '.join(given)})" if given else ""))
    options = dict(options or {})
    overrides = dict(overrides or {})
    if mixer is not None:

        if overrides:
            raise UsageError(f"--set {', '.join(overrides)} applies to a model (--preset/--spec), not to --mixer")
        d = 256 if d_model is None else d_model
        params = _meta_params(mixer, d, options)
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        return {"kind": "mixer", "name": mixer, "options": options, "d_model": d,
                "label": f"{mixer}({opts})" if opts else mixer, "params": params}
    from archs.model import ModelSpec

    if options:
        raise UsageError("--option applies to --mixer; for a model use --set field=value "
                         "(e.g. --set mixer_options='{\"attention\": {\"impl\": \"math\"}}')")
    if d_model is not None:
        overrides["d_model"] = d_model
    run_dir = None
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / "spec.json").is_file():
            raise UsageError(f"{run_dir} is not a run directory (no spec.json)")
        if overrides:
            raise UsageError(f"a run's model is fixed; --d-model/--set ({', '.join(overrides)}) cannot change it")
        data = json.loads((run_dir / "spec.json").read_text())["model"]
        label = f"run {run_dir.name}"
        model_spec = ModelSpec.from_dict(data)
    elif preset is not None:
        model_spec = ModelSpec.from_preset(preset, **overrides)
        label = f"preset {preset}" + "".join(f" {k}={v}" for k, v in overrides.items())
    else:
        if isinstance(spec, dict):
            data, label = spec, "spec"
        else:
            path = Path(spec)  # type: ignore[arg-type]
            if not path.is_file():
                raise UsageError(f"--spec {path}: no such file")
            data, label = json.loads(path.read_text()), f"spec {path.name}"
        if "model" in data and isinstance(data["model"], dict):  # a run's spec.json
            data = data["model"]
        if overrides:
            data = {k: v for k, v in data.items() if k != "resolved_layers"}
            data.update(overrides)
            label += "".join(f" {k}={v}" for k, v in overrides.items())
        model_spec = ModelSpec.from_dict(data)
    model_spec.check_builds()
    mixers: dict[str, int] = {}
    for layer in model_spec.resolved_layers:
        mixers[layer.mixer] = mixers.get(layer.mixer, 0) + 1
    out = {"kind": "model", "spec": model_spec.to_dict(), "label": label,
           "layers": " ".join(f"{n}x{m}" for m, n in mixers.items())}
    if run_dir is not None:
        out["run"] = str(run_dir)
    return out


def _meta_params(mixer: str, d_model: int, options: dict[str, Any]) -> int:
    """Build the mixer layer on the meta device (no memory): its parameter count, or a `UsageError` naming
    what does not build (the registry's own errors pass through: they name the mixer or option)."""
    import torch

    from registry import MIXERS, MixerlabError

    if not isinstance(d_model, int) or isinstance(d_model, bool) or not 0 < d_model < 2**31:
        raise UsageError(f"--d-model {d_model!r}: must be a positive integer below 2^31")
    try:
        with torch.device("meta"):
            layer = MIXERS.create(mixer, d_model=d_model, layer_idx=0, **options)
    except MixerlabError:
        raise
    except Exception as exc:  # a constraint between the width and an option, known to the mixer alone
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"--mixer {mixer} --d-model {d_model}"
                         + "".join(f" --option {k}={v}" for k, v in options.items()) + f": {first}") from exc
    return sum(p.numel() for p in layer.parameters())


def length_limit(target: dict[str, Any]) -> int | None:
    """The longest sequence the target can run (learned positions' ``max_seq_len``), or ``None``."""
    if target.get("kind") != "model":
        return None
    from archs.model import ModelSpec

    return ModelSpec.from_dict(target["spec"]).length_limit


def build_target(target: dict[str, Any], device: str = "cpu", dtype: str = "float32") -> Any:
    """The module a target names (a mixer layer or a `LanguageModel`, fresh weights), on ``device``."""
    import torch

    dt = getattr(torch, dtype)
    if target["kind"] == "mixer":
        from registry import MIXERS

        module = MIXERS.create(target["name"], d_model=target["d_model"], layer_idx=0, **target["options"])
    elif target["kind"] == "model":
        from archs.model import LanguageModel, ModelSpec

        module = LanguageModel(ModelSpec.from_dict(target["spec"]))
    else:
        raise UsageError(f"unknown target kind {target.get('kind')!r}; make targets with resolve_target")
    return module.to(device=device, dtype=dt)
