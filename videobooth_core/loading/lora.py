"""SD 1.x LoRAs on VideoBooth: kohya (``lora_unet_*`` / ``lora_te_*``, LoCon convolutions included), diffusers and
PEFT key formats, merged into the weights with exact undo.

A LoRA layer adds ``strength * scale * up @ down`` to one weight, ``scale = alpha / rank`` (kohya's ``.alpha``,
PEFT's ``lora_alpha`` from ``adapter_config.json`` beside the file; 1 without either). Convolution LoRAs (LoCon,
``down`` (rank, in, kh, kw), ``up`` (out, rank, 1, 1)) are the same product reshaped to the kernel. Several LoRAs
stack: their deltas are summed in float32 and added once, so the order does not matter.

Names are matched against alias tables built from the models' own module names (the UNet's are diffusers'
``UNet2DConditionModel`` names, the text encoder's transformers' ``CLIPTextModel`` names): ``lora_unet_`` + the
name with ``_`` for ``.`` (kohya), the same on the LDM names (``lora_unet_input_blocks_1_1_proj_in``, kohya/SGM),
``unet.``/``text_encoder.`` + the name (diffusers), ``base_model.model.`` + the name (PEFT), and the old diffusers
attention-processor names (``attn1.processor.to_q_lora``). Building the table from the model is unambiguous
(``down_blocks_0`` vs ``down.blocks.0``), which is why diffusers' string-rewriting converters are not used here.

Key/value layers: VideoBooth attends with the mapper's projections, not the UNet's own ``attn1``/``attn2``
``to_k``/``to_v``, so a LoRA's K/V deltas are applied to the mapper's projections (``kv="mapper"``, see
:func:`~videobooth_core.loading.sd_checkpoint.kv_target_modules` and the measurement in
``benchmarks/lora_kv_effect.py``) or left out (``kv="ignore"``).

Anything that matches nothing (an SDXL LoRA, a text-encoder LoRA with no text encoder) is an error listing it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, explain
from .sd_checkpoint import KV_MODES, KeyValueMode, KV_PROJECTION_RE, kv_target_modules, ldm_name
from .weight_files import read_state_dict, unwrap_state_dict
from .weight_patch import WeightPatch, check_patchable

logger = logging.getLogger(__name__)

DEFAULT_KV_MODE: KeyValueMode = "mapper"
"""LoRA K/V deltas go onto the mapper's projections by default (the measured decision; README, *SD 1.x checkpoints
and LoRAs*)."""

# (suffix, role), ordered: the first that matches decides
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
)
_UNSUPPORTED = ("hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w2", "dora_scale", "lora_magnitude_vector", "oft_blocks",
                ".diff", ".diff_b")
_OLD_PROCESSOR = ((r"\.processor\.to_(q|k|v)_lora$", r".to_\1"), (r"\.processor\.to_out_lora$", r".to_out.0"),
                  (r"\.self_attn\.to_(q|k|v)_lora$", r".self_attn.\1_proj"), (r"\.self_attn\.to_out_lora$",
                                                                                 r".self_attn.out_proj"))
_SDXL_HINTS = ("lora_te2_", "text_encoder_2.", "transformer_blocks_1_", "transformer_blocks.1.", "label_emb",
               "add_embedding", "input_blocks_7_", "input_blocks.7.")


@dataclass
class LoraLayer:
    """One low-rank update: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), ``alpha`` or None."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """``scale * up @ down`` in float32, shaped like the weight it updates."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(shape)


@dataclass
class LoraFile:
    """A LoRA's layers grouped by the name stem they had in the file (``source`` labels the messages)."""

    layers: dict[str, LoraLayer]
    source: str = "the LoRA"
    default_alpha: float | None = None
    """``lora_alpha`` of a PEFT ``adapter_config.json`` (per-layer ``.alpha`` entries take precedence)."""
    rslora: bool = False


def parse_lora(state_dict: Mapping[str, torch.Tensor], source: str = "the LoRA",
               default_alpha: float | None = None, rslora: bool = False) -> LoraFile:
    """Group a LoRA state dict's keys into layers.

    Raises:
        CheckpointError: an algorithm other than LoRA/LoCon (LoHa, LoKr, DoRA, OFT, full diffs), a layer without
            its up or down half, or keys that are no LoRA at all.
    """
    unsupported = [k for k in state_dict if any(marker in k for marker in _UNSUPPORTED)]
    if unsupported:
        raise CheckpointError(explain(
            f"{source} uses a LyCORIS/DoRA variant this pack does not merge (only LoRA and LoCon)",
            _listed(unsupported, 3), "use a plain LoRA/LoCon file, or merge it into a checkpoint elsewhere"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in state_dict.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            foreign.append(key)
    if foreign:
        raise CheckpointError(explain(f"{source} has keys that are not LoRA weights", _listed(foreign),
                                      "choose a LoRA file (kohya, diffusers or PEFT format) from the loras folder"))
    layers = {}
    for stem, roles in parts.items():
        if "mid" in roles:
            raise CheckpointError(explain(f"{source} uses LoCon's Tucker decomposition (lora_mid), not supported",
                                          stem, "use a LoRA/LoCon without --use_tucker"))
        if "down" not in roles or "up" not in roles:
            raise CheckpointError(explain(f"{source}'s layer lacks its {'up' if 'down' in roles else 'down'} half",
                                          stem, "the file is incomplete; download it again"))
        alpha = float(roles["alpha"]) if "alpha" in roles else default_alpha
        if alpha is not None and rslora:
            alpha = alpha * roles["down"].shape[0] ** 0.5  # rsLoRA scales by alpha / sqrt(rank)
        layers[stem] = LoraLayer(roles["down"], roles["up"], alpha)
    if not layers:
        raise CheckpointError(explain(f"{source} holds no LoRA layers", source, "choose a LoRA file"))
    return LoraFile(layers, source, default_alpha, rslora)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file safely (safetensors, or a weights-only pickle); a PEFT ``adapter_config.json`` beside it
    gives ``lora_alpha`` (and rsLoRA)."""
    p = Path(path)
    state_dict = unwrap_state_dict(read_state_dict(p), ("state_dict",), source=p)
    default_alpha, rslora = None, False
    config = p.parent / "adapter_config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(explain(f"cannot read {config}", error, "fix or remove adapter_config.json")) from None
        if data.get("lora_alpha") is not None:
            default_alpha = float(data["lora_alpha"])
        rslora = bool(data.get("use_rslora", False))
    return parse_lora(state_dict, p.name, default_alpha, rslora)


# -- names ------------------------------------------------------------------------------------------------------
@dataclass
class _Target:
    part: str
    """``unet`` or ``text``."""
    name: str
    """The module path in its model."""
    kv: bool = False


def _unet_aliases(unet: nn.Module) -> dict[str, _Target]:
    config = unet.config
    levels = len(config.block_out_channels)
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    kv_names = [f"{site.site}.transformer_blocks.0.{attn}.{proj}" for site in unet.attention_sites
                for attn in ("attn1", "attn2") for proj in ("to_k", "to_v")]
    aliases: dict[str, _Target] = {}
    for name in dict.fromkeys(names + kv_names):
        target = _Target("unet", name, kv=bool(KV_PROJECTION_RE.match(name + ".weight")))
        forms = [name]
        ldm = ldm_name(name, config.layers_per_block, levels)
        if ldm is not None:
            forms += [ldm, "diffusion_model." + ldm, "model.diffusion_model." + ldm]
        for form in forms:
            aliases[form] = target
            aliases["lora_unet_" + form.replace(".", "_")] = target
        for prefix in ("unet.", "base_model.model."):
            aliases[prefix + name] = target
    return aliases


def _text_aliases(text_encoder: nn.Module | None) -> dict[str, _Target]:
    if text_encoder is None:
        return {}
    aliases: dict[str, _Target] = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear):
            target = _Target("text", name)
            # LoRA files name CLIPTextModel's modules under text_model.*; transformers 5 dropped that level
            full = name if name.startswith("text_model.") else "text_model." + name
            for form in (full, "text_encoder." + full, "base_model.model." + full):
                aliases[form] = target
            aliases["lora_te_" + full.replace(".", "_")] = target
            aliases["lora_te1_" + full.replace(".", "_")] = target
    return aliases


def _normalise(stem: str) -> str:
    for pattern, replacement in _OLD_PROCESSOR:
        stem = re.sub(pattern, replacement, stem)
    return stem


def _listed(keys: Sequence[str], limit: int = 4) -> list[str]:
    return list(keys[:limit]) + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def _is_text_stem(stem: str) -> bool:
    if stem.startswith(("lora_te2_", "text_encoder_2.")):
        return False  # SDXL's second text encoder: nothing here matches it
    return stem.startswith(("lora_te_", "lora_te1_", "text_encoder.")) or ".self_attn." in stem or \
        "text_model" in stem


# -- applying ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a file (or parsed :class:`LoraFile`) and its strengths."""

    lora: str | Path | LoraFile
    strength: float = 1.0
    """On the UNet (and, with ``kv="mapper"``, the mapper's K/V projections)."""
    text_strength: float | None = None
    """On the CLIP text encoder; None: the same as ``strength``."""


@dataclass
class LoraReport:
    layers: int = 0
    """UNet and text-encoder weights changed."""
    unet_layers: int = 0
    text_layers: int = 0
    kv_layers: int = 0
    """LoRA layers on attn1/attn2 to_k/to_v."""
    kv_applied: int = 0
    """Mapper projections they changed (0 with ``kv="ignore"``)."""
    per_file: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kv = (f"{self.kv_layers} key/value layers on {self.kv_applied} mapper projections" if self.kv_applied else
              f"{self.kv_layers} key/value layers left out (kv=ignore)" if self.kv_layers else "no key/value layers")
        return f"LoRA: {self.unet_layers} UNet and {self.text_layers} text-encoder weights changed; {kv}"


def apply_loras(
    unet: nn.Module,
    loras: Sequence[LoraSpec],
    *,
    text_encoder: nn.Module | None = None,
    kv: KeyValueMode = DEFAULT_KV_MODE,
    patch: WeightPatch | None = None,
) -> tuple[WeightPatch, LoraReport]:
    """Merge ``loras`` (stacked) into the UNet (the mapper's K/V projections with ``kv="mapper"``) and the CLIP text
    encoder. Nothing changes unless every LoRA layer of every file matches a weight of the right shape.

    Args:
        unet: the VideoBooth UNet (mapper projections attached or not).
        loras: the files and their strengths; strength 0 leaves that part out entirely (bit-identical).
        text_encoder: the ``transformers.CLIPTextModel`` the text-encoder layers go to; needed when a LoRA has
            text-encoder layers and a non-zero text strength.
        kv: ``"mapper"`` or ``"ignore"`` (see the module docstring).
        patch: add to this :class:`WeightPatch` (e.g. the base checkpoint's), so one ``undo()`` undoes both.

    Returns:
        the patch (``undo()`` puts every original tensor back exactly) and what was changed.

    Raises:
        CheckpointError: unmatched layers (listed; an SDXL LoRA is named as such), wrong shapes, text-encoder
            layers without a text encoder, an unknown ``kv``, or a streamed UNet.
    """
    check_patchable(unet, "a LoRA")
    if kv not in KV_MODES:
        raise CheckpointError(explain("unknown key/value mode", kv, f"choose one of {', '.join(KV_MODES)}"))
    unet_aliases, text_aliases = _unet_aliases(unet), _text_aliases(text_encoder)
    report = LoraReport()
    deltas: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] = {}

    def add(module: nn.Module, delta: torch.Tensor) -> None:
        key = (id(module), "weight")
        if key in deltas:
            deltas[key] = (module, deltas[key][1] + delta)
        else:
            deltas[key] = (module, delta)

    for spec in loras:
        lora = spec.lora if isinstance(spec.lora, LoraFile) else read_lora(spec.lora)
        text_strength = spec.strength if spec.text_strength is None else spec.text_strength
        unmatched, no_text = [], []
        resolved: list[tuple[_Target, LoraLayer, str]] = []
        for stem, layer in lora.layers.items():
            name = _normalise(stem)
            target = unet_aliases.get(name) or text_aliases.get(name)
            if target is None:
                (no_text if text_encoder is None and _is_text_stem(name) else unmatched).append(stem)
            else:
                resolved.append((target, layer, stem))
        if unmatched:
            hint = (" (it looks like an SDXL LoRA)" if any(h in k for k in unmatched for h in _SDXL_HINTS)
                    else "")
            raise CheckpointError(explain(
                f"{len(unmatched)} of {len(lora.layers)} layers of {lora.source} match no layer of this VideoBooth "
                f"model{hint}", _listed(unmatched),
                "use an SD 1.x LoRA (LoRAs for SDXL, SD 2.x, SD3 or Flux do not fit)"))
        if no_text and text_strength != 0:
            raise CheckpointError(explain(
                f"{lora.source} has {len(no_text)} text-encoder layers and no text encoder was given",
                _listed(no_text, 2), "pass the CLIP text encoder (connect the clip input), or set the text "
                "strength to 0 to leave them out"))
        for target, layer, stem in resolved:
            strength = text_strength if target.part == "text" else spec.strength
            if strength == 0:
                continue
            if target.part == "text":
                modules = [text_encoder.get_submodule(target.name)]
            elif target.kv:
                modules = kv_target_modules(unet, target.name) or []
                report.kv_layers += 1
            else:
                modules = [unet.get_submodule(target.name)]
            for module in modules:
                weight = module.weight
                if layer.up.shape[0] != weight.shape[0] or layer.up.flatten(1).shape[1] != layer.rank or \
                        layer.down.numel() // layer.rank * weight.shape[0] != weight.numel():
                    raise CheckpointError(explain(
                        f"{lora.source}'s layer {stem} (down {tuple(layer.down.shape)}, up {tuple(layer.up.shape)}) "
                        f"does not fit the weight {target.name} of shape {tuple(weight.shape)}",
                        tuple(weight.shape), "use a LoRA made for SD 1.x at this model's size"))
                if target.kv and kv == "ignore" and getattr(unet, "attached_projections", None) is not None:
                    continue  # checked, but the UNet's own K/V are not used with the mapper's attached
                add(module, strength * layer.delta(weight.shape).to(weight.device))
        report.per_file.append(f"{lora.source} x{spec.strength:g}")

    patch = patch if patch is not None else WeightPatch()
    text_modules = {id(m) for m in text_encoder.modules()} if text_encoder is not None else set()
    projections = getattr(unet, "attached_projections", None) or {}
    mapper_modules = {id(getattr(p, f)) for p in projections.values() for f in p.__dataclass_fields__}
    with torch.no_grad():
        for module, delta in deltas.values():
            weight = module.weight
            patch.replace(module, "weight", (weight.float() + delta).to(weight.dtype))
            if id(module) in text_modules:
                report.text_layers += 1
            elif id(module) in mapper_modules:
                report.kv_applied += 1
            else:
                report.unet_layers += 1
    report.layers = len(deltas)
    logger.info("%s (%s)", report.describe(), ", ".join(report.per_file))
    return patch, report


def parse_lora_argument(value: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` (the command line's and the jobs' form) → (path, strength); a Windows drive letter or a
    colon inside the path is kept when what follows the last colon is not a number."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0


def personalised_copies(
    unet: nn.Module,
    mapper: nn.Module,
    *,
    base_checkpoint: str | Path | None = None,
    loras: Sequence[LoraSpec] = (),
    text_encoder: nn.Module | None = None,
    kv: KeyValueMode | None = None,
) -> tuple[nn.Module, nn.Module, nn.Module | None, list[str]]:
    """Copies of the UNet, the mapper (and the text encoder) with an SD 1.x checkpoint's spatial layers and/or
    LoRAs applied; the given modules stay exactly as they were (the copies share every unchanged tensor, so only
    the changed weights take new memory). For hosts whose inputs are shared and cached (ComfyUI nodes).

    Returns:
        (unet, mapper, text encoder or None, one line per change).
    """
    from .sd_checkpoint import load_sd_checkpoint
    from .weight_patch import share_weights_copy

    check_patchable(unet, "an SD 1.x checkpoint or a LoRA")
    modules = [unet, mapper] + ([text_encoder] if text_encoder is not None else [])
    copies = share_weights_copy(modules)
    unet_copy, mapper_copy = copies[0], copies[1]
    text_copy = copies[2] if text_encoder is not None else None
    lines = []
    patch = WeightPatch()
    if base_checkpoint is not None:
        _, report = load_sd_checkpoint(unet_copy, base_checkpoint, kv=kv or "ignore", patch=patch)
        lines.append(f"{Path(base_checkpoint).name}: {report.describe()}")
    if loras:
        _, report = apply_loras(unet_copy, loras, text_encoder=text_copy, kv=kv or DEFAULT_KV_MODE, patch=patch)
        lines.append(report.describe())
    return unet_copy, mapper_copy, text_copy, lines
