"""Delta modules (forms applied as DELTA) at translation: read them, add them to a model's weights
and put the original weights back exactly."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from datm import artifacts
from datm.merge.base import DELTA_CONFIG, DELTA_WEIGHTS, MergeError
from datm.merge.forms import DELTA, FORMS, DeltaForm
from datm.merge.sources import PEFT_PREFIX


def iter_delta(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (base weight name, dense float32 ΔW) of a dense or sparse delta directory, one at a time."""
    path = Path(path)
    config_file = path / DELTA_CONFIG
    if not config_file.is_file():
        raise MergeError(f"{path}: not a datm delta directory (no {DELTA_CONFIG})")
    config = artifacts.read_json(config_file)
    names = [n for n, f in FORMS.items() if f.applied_as == DELTA]
    form = FORMS.get(config.get("form"))
    if not isinstance(form, DeltaForm):
        raise MergeError(
            f"{config_file}: 'form' must be one of {', '.join(names)}, got {config.get('form')!r}"
        )
    with safe_open(path / DELTA_WEIGHTS, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for entry in config["modules"]:
            name, shape = entry["weight"], list(entry["shape"])
            missing = [k for k in form.tensor_names(name) if k not in keys]
            if missing:
                raise MergeError(
                    f"{path / DELTA_WEIGHTS}: no tensor {missing[0]!r} ({DELTA_CONFIG} lists it)"
                )
            delta = form.read(f, name, shape)
            if list(delta.shape) != shape:
                raise MergeError(f"{path / DELTA_WEIGHTS}: {name} is {list(delta.shape)}, expected {shape}")
            yield name, delta


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    """Dense float32 ΔW per base weight name of a dense or sparse delta directory."""
    return dict(iter_delta(path))


class AppliedDelta:
    """A delta directory added to a model's weights; `restore` puts the original weights back.

    Exact by construction: each touched weight W is copied (to the CPU, so no accelerator memory is
    spent on it) before it becomes cast(W + ΔW), the sum formed in float32 and rounded once to W's
    dtype, and `restore` copies the saved W back bit for bit. Subtracting ΔW again would not be exact
    in low precision (bf16 rounding drifts the base a little with every pass), and adding ΔW as an
    extra output term would not compute the same function as a model with the merged weights.

    `rel_error` is ‖ΔW as applied − ΔW‖_F / ‖ΔW‖_F over all touched weights, where ΔW as applied is
    cast(W + ΔW) − W: what rounding to the serving dtype does to the merged module (≈0 in float32,
    often large in bf16 where ‖ΔW‖ is small against ‖W‖).
    """

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.path = Path(path)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        delta_sq = error_sq = 0.0
        with torch.no_grad():
            try:
                for name, delta in iter_delta(self.path):
                    weight = _find_weight(model, name)
                    if list(weight.shape) != list(delta.shape):
                        raise MergeError(
                            f"{self.path}: delta {name} has shape {list(delta.shape)} but the model's is "
                            f"{list(weight.shape)}"
                        )
                    original = weight.detach().to("cpu", copy=True)
                    self._saved.append((weight, original))
                    delta = delta.to(weight.device)
                    weight.copy_((weight.float() + delta).to(weight.dtype))
                    applied_error = weight.float() - original.to(weight.device).float() - delta
                    delta_sq += float(torch.linalg.vector_norm(delta)) ** 2
                    error_sq += float(torch.linalg.vector_norm(applied_error)) ** 2
                    del delta, applied_error
            except BaseException:
                self.restore()
                raise
        self.rel_error = math.sqrt(error_sq / delta_sq) if delta_sq > 0 else 0.0

    def restore(self) -> None:
        """Put back every weight this delta touched, exactly as it was."""
        with torch.no_grad():
            for weight, original in self._saved:
                weight.copy_(original.to(weight.device))
        self._saved = []

    def __enter__(self) -> AppliedDelta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def apply_delta(model: torch.nn.Module, path: Path) -> AppliedDelta:
    """Add a delta directory to `model`'s weights in place until `.restore()` (or the end of a
    ``with`` block); see `AppliedDelta`.

    Works on a plain transformers model and on a PEFT-wrapped one (modules under
    ``base_model.model.``, LoRA layers keeping the original weight in ``base_layer``).
    """
    return AppliedDelta(model, path)


def _find_weight(model: torch.nn.Module, weight_name: str) -> torch.Tensor:
    module_name = weight_name.removesuffix(".weight")
    for prefix in ("", PEFT_PREFIX):
        try:
            module = model.get_submodule(prefix + module_name)
        except AttributeError:
            continue
        while hasattr(module, "base_layer"):  # peft's LoRA layer wraps the original layer
            module = module.base_layer
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    raise MergeError(
        f"model has no weight {weight_name} (nor {PEFT_PREFIX}{weight_name}) to add the delta to"
    )
