"""Gradient probe: before any training, how well do the directions' LoRA gradients agree?

Gradient Vaccine (Wang et al., 2021) measures conflict between languages in multilingual NMT as the
cosine similarity of their gradients. Here: attach one fresh LoRA (seeded, so every direction sees
the same initial point), accumulate each direction's gradient of the target-only training loss over a
small sample, and compare directions by cosine, over all LoRA parameters and per transformer layer.
A positive cosine means a step for one direction also helps the other (synergy), a negative one that
it hurts (conflict). `auto_measurements_from_probe` turns the matrix into the per-direction numbers
that `datm.plan.auto_plan` decides from.

Which gradient: LoRA starts with B = 0 (peft's default), so the gradient with respect to A,
Bᵀ·(∂L/∂h)·xᵀ, is exactly zero at the start for every direction, and the whole first-step signal is
in the gradient with respect to B. The probe therefore compares B gradients only: adding the A
gradients would add zeros (changing no dot product and no norm) while doubling what the probe holds
in memory (n_directions × the LoRA-B parameter count, in float32).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datm import artifacts
from datm.artifacts import RunDir
from datm.config import Config, ConfigError, LoraConfig
from datm.data import IGNORE_INDEX, Example
from datm.errors import DatmError
from datm.languages import EN_XX, FAMILIES, FAMILY_NAMES, XX_EN, Direction, by_family
from datm.log import get_logger

log = get_logger(__name__)

# The layer index in parameter names of decoder stacks: `model.layers.3.` (Llama, Gemma, Qwen, ...),
# `transformer.h.3.` (GPT-2, Falcon, Bloom), `blocks.3.`, `layer.3.`.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class ProbeError(DatmError):
    pass


@dataclass
class ProbeResult:
    directions: list[str]  # XX→En first, then En→XX; the rows and columns of every matrix
    matrix: list[list[float]]  # cosine similarity over all LoRA-B gradients
    per_layer: dict[int, list[list[float]]]  # transformer layer index -> cosine matrix of its LoRA-B part
    seconds: float
    examples: dict[str, int] = field(default_factory=dict)  # direction -> examples the gradient summed over
    parameters: int = 0  # LoRA-B parameters compared
    groups: dict[str, list[str]] | None = None  # the config's groups, for auto_measurements_from_probe

    def similarity(self, a: str, b: str) -> float:
        return self.matrix[self.directions.index(a)][self.directions.index(b)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "directions": self.directions,
            "matrix": self.matrix,
            "per_layer": {str(k): v for k, v in sorted(self.per_layer.items())},
            "seconds": self.seconds,
            "examples": self.examples,
            "parameters": self.parameters,
            "groups": self.groups,
            "family_similarity": family_similarity(self.directions, self.matrix),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> ProbeResult:
        try:
            directions = [str(x) for x in d["directions"]]
            matrix = [[float(v) for v in row] for row in d["matrix"]]
            per_layer = {int(k): [[float(v) for v in row] for row in m] for k, m in d["per_layer"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ProbeError(
                f"{source}: not a probe result (expected 'directions', 'matrix' and 'per_layer' as written "
                f"by `datm probe`): {type(e).__name__}: {e}"
            ) from None
        for d_ in directions:
            try:
                Direction.parse(d_)
            except ValueError as e:
                raise ProbeError(f"{source}: directions: {e}") from None
        n = len(directions)
        if len(matrix) != n or any(len(row) != n for row in matrix):
            raise ProbeError(f"{source}: 'matrix' must be {n}×{n} (one row and column per direction)")
        return cls(
            directions,
            matrix,
            per_layer,
            float(d.get("seconds", 0.0)),
            dict(d.get("examples", {})),
            int(d.get("parameters", 0)),
            d.get("groups"),
        )


# ----------------------------------------------------------------------------------- measuring


def layer_of(parameter_name: str) -> int | None:
    """The transformer layer a parameter belongs to, or None (e.g. a module outside the layer stack)."""
    found = _LAYER.search(parameter_name)
    return int(found.group(1)) if found else None


def _family_order(directions: list[str]) -> list[str]:
    return [d for ds in by_family(directions).values() for d in ds]


def _target_tokens(example: Example) -> int:
    """Target positions the loss counts (labels after the prompt, shifted by one)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def _cosine_matrix(vectors: torch.Tensor) -> list[list[float]]:
    """Cosine similarity between the rows; 0 where a row is all zeros (no direction to compare)."""
    v = vectors.double()
    norms = v.norm(dim=1)
    dots = v @ v.T
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    cos = ((cos + cos.T) / 2).clamp(-1.0, 1.0)  # exactly symmetric, whatever the matmul's rounding
    cos.fill_diagonal_(1.0)
    return cos.tolist()


def probe(
    model: Any,
    tokenizer: Any,
    directions_examples: Mapping[str, list[Example]],
    lora: LoraConfig,
    seed: int = 1,
    batch_size: int = 8,
) -> ProbeResult:
    """Cosine similarities between the directions' LoRA gradients at a fresh LoRA's initial point.

    Per direction, the gradient of the target-only loss (mean over all its examples' target tokens) is
    accumulated batch by batch. The model is in eval mode (no dropout) so the
    result depends only on the seed and the data. It is handed back as it came: without LoRA layers,
    in its training mode, with its parameters' requires_grad flags.
    """
    from peft import get_peft_model

    from datm.train import peft_lora_config

    _check_probe_inputs(model, directions_examples, batch_size)
    directions = _family_order(list(directions_examples))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    t0 = time.perf_counter()
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(seed)  # the LoRA A init: the same starting point on every call with this seed
    peft_model = get_peft_model(model, peft_lora_config(lora))
    try:
        peft_model.eval()  # no dropout: the gradient is a function of the data alone
        lora_b = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_B." in n]
        if not lora_b:
            raise ProbeError(f"no LoRA layers were attached (lora.target_modules = {lora.target_modules!r})")
        gradients = _direction_gradients(
            peft_model, lora_b, directions, directions_examples, pad_id, device, batch_size
        )
    finally:
        peft_model.unload()  # give the base model back without LoRA layers
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        model.train(was_training)

    stacked = torch.stack(gradients)
    per_layer = _per_layer_cosines(stacked, lora_b)
    return ProbeResult(
        directions=directions,
        matrix=_cosine_matrix(stacked),
        per_layer=per_layer,
        seconds=round(time.perf_counter() - t0, 3),
        examples={d: len(directions_examples[d]) for d in directions},
        parameters=sum(p.numel() for _, p in lora_b),
    )


def _check_probe_inputs(
    model: Any, directions_examples: Mapping[str, list[Example]], batch_size: int
) -> None:
    """At least two directions, each with examples, a model without LoRA layers, and a positive batch size."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if len(directions_examples) < 2:
        raise ProbeError(f"the probe compares directions; got {len(directions_examples)}, need at least 2")
    empty = [d for d, ex in directions_examples.items() if not ex]
    if empty:
        raise ProbeError(f"no examples for direction(s) {empty}: the probe needs each direction's data")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ProbeError("the model already carries LoRA layers; the probe needs the bare base model")
    if batch_size < 1:
        raise ProbeError(f"batch_size must be >= 1, got {batch_size}")


def _direction_gradients(
    peft_model: Any,
    lora_b: list[tuple[str, torch.nn.Parameter]],
    directions: list[str],
    directions_examples: Mapping[str, list[Example]],
    pad_id: int,
    device: torch.device,
    batch_size: int,
) -> list[torch.Tensor]:
    """Per direction, in `directions` order: its LoRA-B gradient, flattened in `lora_b` order (on the CPU,
    float32). The gradients are left cleared."""
    causal_lm = peft_model.get_base_model()
    gradients: list[torch.Tensor] = []
    for d in directions:
        examples = directions_examples[d]
        total_tokens = sum(_target_tokens(e) for e in examples)
        if total_tokens == 0:
            raise ProbeError(f"direction {d}: its examples have no target tokens")
        peft_model.zero_grad(set_to_none=True)
        _accumulate_gradient(causal_lm, examples, total_tokens, pad_id, device, batch_size)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in lora_b]
        gradients.append(torch.cat([g.detach().flatten().float().cpu() for g in grads]))
        if not torch.isfinite(gradients[-1]).all():
            raise ProbeError(f"direction {d}: the gradient is not finite (loss overflow?)")
        if not gradients[-1].any():
            raise ProbeError(f"direction {d}: the gradient is all zeros")
    peft_model.zero_grad(set_to_none=True)
    return gradients


def _accumulate_gradient(
    causal_lm: Any,
    examples: list[Example],
    total_tokens: int,
    pad_id: int,
    device: torch.device,
    batch_size: int,
) -> None:
    """Backpropagate one direction's target-only loss, batch by batch, into the parameters' gradients."""
    from datm.train import collate, target_loss

    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        # target_loss is the batch's mean over target tokens; weighting it by the batch's share
        # of tokens makes the sum the mean over all of the direction's target tokens, so the
        # gradient does not depend on how the examples are batched.
        share = sum(_target_tokens(e) for e in chunk) / total_tokens
        if share > 0:
            (target_loss(causal_lm, batch) * share).backward()


def _per_layer_cosines(
    stacked: torch.Tensor, lora_b: list[tuple[str, torch.nn.Parameter]]
) -> dict[int, list[list[float]]]:
    """The cosine matrix of each transformer layer's part of the gradients `stacked` (one row per
    direction, columns in `lora_b` order); parameters outside the layer stack count in no layer."""
    spans: dict[int, list[tuple[int, int]]] = {}
    offset = 0
    for name, p in lora_b:
        layer = layer_of(name)
        if layer is not None:
            spans.setdefault(layer, []).append((offset, offset + p.numel()))
        offset += p.numel()
    return {
        layer: _cosine_matrix(torch.cat([stacked[:, a:b] for a, b in ranges], dim=1))
        for layer, ranges in sorted(spans.items())
    }


# ----------------------------------------------------------------------------------- summaries


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def family_similarity(directions: list[str], matrix: list[list[float]]) -> dict[str, float | None]:
    """Mean cosine over the pairs of distinct directions within XX→En, within En→XX, and across the
    two families (None where there is no such pair). The paper predicts that En→XX directions share
    more (synergy) than XX→En directions do; this reports what the gradients say."""
    fam = [Direction.parse(d).family for d in directions]
    pairs: dict[str, list[float]] = {XX_EN: [], EN_XX: [], "cross": []}
    for i in range(len(directions)):
        for j in range(i + 1, len(directions)):
            key = fam[i] if fam[i] == fam[j] else "cross"
            pairs[key].append(matrix[i][j])
    return {k: _mean(v) for k, v in pairs.items()}


def format_summary(result: ProbeResult) -> str:
    sims = family_similarity(result.directions, result.matrix)

    def show(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.3f}"

    lines = [
        f"gradient cosine, mean over direction pairs ({result.parameters:,} LoRA-B parameters, "
        f"{result.seconds:.1f}s):",
        "  "
        + "".join(f"within {FAMILY_NAMES[f]}: {show(sims[f])}   " for f in FAMILIES)
        + f"across families: {show(sims['cross'])}",
    ]
    if sims[XX_EN] is not None and sims[EN_XX] is not None:
        more = FAMILY_NAMES[EN_XX] if sims[EN_XX] > sims[XX_EN] else FAMILY_NAMES[XX_EN]
        lines.append(f"  {more} directions share more gradient direction")
    width = max(len(d) for d in result.directions)
    lines.append("")
    lines.append(" " * (width + 1) + " ".join(f"{d:>{max(6, len(d))}}" for d in result.directions))
    for d, row in zip(result.directions, result.matrix, strict=True):
        cells = " ".join(f"{v:>{max(6, len(c))}.2f}" for v, c in zip(row, result.directions, strict=True))
        lines.append(f"{d:<{width}} {cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- auto plans


def auto_measurements_from_probe(
    probe_json: str | Path | Mapping[str, Any] | ProbeResult, groups: dict[str, list[str]] | None = None
) -> dict[str, float]:
    """Per direction: the mean gradient cosine with the other directions of the same family in the same
    group (0 for a direction with no such partner, which `auto_plan` then trains on its own).

    `probe_json` is a probe.json path, its loaded content or a ProbeResult; `groups` default to the
    groups recorded in it (written by `probe_config`).
    """
    source = str(probe_json) if isinstance(probe_json, (str, Path)) else "probe result"
    if isinstance(probe_json, ProbeResult):
        result = probe_json
    else:
        raw = artifacts.read_json(probe_json) if isinstance(probe_json, (str, Path)) else probe_json
        result = ProbeResult.from_dict(raw, source)
    groups = groups if groups is not None else result.groups
    if not groups:
        raise ProbeError(f"{source}: records no groups; pass the config's groups")
    group_of = {x: g for g, members in groups.items() for x in members}
    out: dict[str, float] = {}
    for i, d in enumerate(result.directions):
        direction = Direction.parse(d)
        if direction.foreign not in group_of:
            raise ProbeError(f"{source}: direction {d} has a language in none of the groups {groups}")
        partners = [
            j
            for j, other in enumerate(result.directions)
            if j != i
            and Direction.parse(other).family == direction.family
            and group_of.get(Direction.parse(other).foreign) == group_of[direction.foreign]
        ]
        mean = _mean([result.matrix[i][j] for j in partners])
        out[d] = 0.0 if mean is None else mean  # no partner: nothing to train with
    return out


def default_probe_path(cfg: Config) -> Path:
    return RunDir(cfg.output_dir).probe_result


# ----------------------------------------------------------------------------------- files


def plot_probe(result: ProbeResult) -> Any:
    """Heatmap of the cosine matrix, directions on both axes (XX→En, then En→XX), values in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.directions)
    size = max(4.0, 0.55 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # A fixed -1..1 scale, so heatmaps of different models and configs compare by colour.
    image = ax.imshow(result.matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="gradient cosine")
    ax.set_xticks(range(n), result.directions, rotation=90)
    ax.set_yticks(range(n), result.directions)
    font = max(5.0, min(9.0, 120.0 / n))
    for i, row in enumerate(result.matrix):
        for j, value in enumerate(row):
            colour = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=font, color=colour)
    n_xx = sum(Direction.parse(d).family == XX_EN for d in result.directions)
    if 0 < n_xx < n:
        ax.axhline(n_xx - 0.5, color="black", linewidth=1.0)
        ax.axvline(n_xx - 0.5, color="black", linewidth=1.0)
    ax.set_title("LoRA gradient cosine between directions (before training)")
    fig.tight_layout()
    return fig


def write_probe(result: ProbeResult, out: str | Path) -> Path:
    """probe.json and probe.png in the directory `out`; returns the path of probe.json."""
    import io

    out = Path(out)
    buffer = io.BytesIO()
    plot_probe(result).savefig(buffer, format="png")
    artifacts.atomic_write_bytes(out / "probe.png", buffer.getvalue())
    artifacts.atomic_write_json(out / "probe.json", result.to_dict())
    return out / "probe.json"


def probe_config(
    cfg: Config,
    out: str | Path,
    max_examples_per_direction: int = 32,
    model: Any = None,
    tokenizer: Any = None,
) -> ProbeResult:
    """Probe a config's base model on its training data and write probe.json / probe.png into `out`.

    Each direction's examples are the first `max_examples_per_direction` of the seeded sample that
    training draws (`datm.data.select` with train.seed), so the probe sees data the adapters train on.
    Pass `model` and `tokenizer` to reuse loaded ones (e.g. a runner's session).
    """
    from datm import data, models
    from datm import languages as L

    if max_examples_per_direction < 1:
        raise ProbeError(f"examples per direction must be >= 1, got {max_examples_per_direction}")
    if not cfg.data.train:
        raise ConfigError(f"{cfg.source}: data.train is required to probe (the probe uses training data)")
    if model is None or tokenizer is None:
        path = models.resolve(cfg.base_model)
        tokenizer = models.load_tokenizer(path)
        model = models.load_model(path, device="cuda" if torch.cuda.is_available() else None)
    limit = max_examples_per_direction
    if cfg.train.max_examples_per_pair is not None:
        limit = min(limit, cfg.train.max_examples_per_pair)
    fmt = data.PromptFormat(tokenizer, cfg.prompt)
    report = data.ReadReport()
    examples: dict[str, list[Example]] = {}
    for direction in L.directions_for(cfg.languages):
        pairs = data.read_direction(
            cfg.data.train, direction, cfg.data.format, cfg.data.on_bad_record, report, "train"
        )
        examples[str(direction)], _ = data.tokenize_pairs(
            data.select(pairs, limit, cfg.train.seed), fmt, cfg.train.max_length
        )
    if report.skipped:
        log.warning(f"probe: skipped {len(report.skipped)} bad record(s), e.g. {report.skipped[0]}")
    result = probe(model, tokenizer, examples, cfg.lora, seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    result.groups = cfg.resolved_groups()
    write_probe(result, out)
    return result


__all__ = [
    "ProbeError",
    "ProbeResult",
    "auto_measurements_from_probe",
    "default_probe_path",
    "family_similarity",
    "format_summary",
    "layer_of",
    "probe",
    "probe_config",
    "write_probe",
]
