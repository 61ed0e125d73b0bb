"""Tiny random model sets, in the real file formats: ``make-tiny`` (tests, the demo without weights) and the tiny
CLIP towers, VAE and BPE tokenizer it is made of.

The files have the released names and layouts (``watermark_remove_module.pt`` with ``ema_unet``, ``mapper.pt``
with ``ema``, a single-file LDM VAE, single-file CLIP towers, a BPE tokenizer folder) and sit in ComfyUI's
model folder names, so the folder works as ``--models`` for the command line and as a ComfyUI models folder
(with a tiny LoRA in ``loras/``: every file the pack's API workflows name).
The UNet keeps the released model's 8 heads and 32 groups, so no config has to travel with the pickles.
Weights are random: the outputs are noise-like videos, useful only to exercise the whole pipeline.
transformers, diffusers and tokenizers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..conditioning.vae import SD_VAE_SCALING_FACTOR
from ..files import PathLike, atomic_path
from ..models.config import MapperConfig, UNetConfig
from ..models.mapper import Mapper
from ..models.unet_3d import UNet3DModel

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)


TINY_UNET = UNetConfig(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    num_attention_heads=8,
    norm_num_groups=32,
    cross_attention_dim=32,
    watermark_block_out_channels=(32, 64, 64),
)
TINY_MAPPER_HIDDEN = 64

UNET_FILE = "videobooth/watermark_remove_module.pt"
MAPPER_FILE = "videobooth/mapper.pt"
VAE_FILE = "vae/videobooth_tiny_vae.safetensors"
CLIP_VISION_FILE = "clip_vision/videobooth_tiny_clip_vision.safetensors"
CLIP_TEXT_FILE = "text_encoders/videobooth_tiny_clip_text.safetensors"
LORA_FILE = "loras/videobooth_tiny_style.safetensors"
"""A tiny kohya LoRA for the UNet, the file the LoRA workflow's API twin names."""
TOKENIZER_DIR = "text_encoders/videobooth_tiny_tokenizer"
MARKER_FILE = "VIDEOBOOTH_TINY_RANDOM_WEIGHTS.txt"


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a small random value (including those the official code zero-initialises,
    so every module influences the output)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or param.ndim == 1:
                if "norm" in name and name.endswith("weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def tiny_unet_and_mapper(vision_width: int, text_width: int, seed: int = 0) -> tuple[UNet3DModel, Mapper]:
    """A tiny random UNet and its mapper (per-site projections for every attention site)."""
    generator = torch.Generator().manual_seed(seed)
    unet = UNet3DModel(TINY_UNET if TINY_UNET.cross_attention_dim == text_width else
                       UNetConfig(**{**TINY_UNET.__dict__, "cross_attention_dim": text_width}))
    _randomise(unet, generator)
    sites = tuple(sorted((site.site, site.proj_in.out_channels) for site in unet.attention_sites))
    mapper = Mapper(MapperConfig(input_dim=vision_width, hidden_dim=TINY_MAPPER_HIDDEN, output_dim=text_width,
                                 site_channels=sites))
    _randomise(mapper, generator)
    return unet.eval(), mapper.eval()


def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model set into ``out_dir`` (created if needed) and return it.

    Each file (the tokenizer: its folder) appears atomically; the marker file is written last, so a set with a
    marker is complete. Files of the set already in ``out_dir`` are replaced; nothing else there is touched
    (``out_dir`` may be a ComfyUI models folder).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModel

    from ..loading.clip import save_clip_text_single_file, save_clip_vision_single_file
    from ..loading.vae import save_vae_ldm_single_file
    from ..loading.weight_files import save_torch_file

    out = Path(out_dir)
    for sub in ("videobooth", "vae", "clip_vision", "text_encoders", "loras"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)  # transformers/diffusers initialise from the global generator
    text_config, vision_config = tiny_clip_text_config(), tiny_clip_vision_config()
    text = CLIPTextModel(text_config).eval()
    vision = CLIPVisionModel(vision_config).eval()
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    unet, mapper = tiny_unet_and_mapper(vision_config.hidden_size, text_config.hidden_size, seed)

    save_torch_file({"ema_unet": unet.state_dict()}, out / UNET_FILE)
    save_torch_file({"ema": mapper.state_dict()}, out / MAPPER_FILE)
    save_vae_ldm_single_file(vae, out / VAE_FILE)
    save_clip_vision_single_file(vision, out / CLIP_VISION_FILE)
    save_clip_text_single_file(text, out / CLIP_TEXT_FILE)
    write_tiny_tokenizer(out / TOKENIZER_DIR)
    write_tiny_metric_models(out, seed)  # after the others: their random draws are unchanged
    write_tiny_lora(out / LORA_FILE, seed)  # its own generator: the other files are unchanged
    with atomic_path(out / MARKER_FILE) as tmp:
        tmp.write_text(
            "These VideoBooth models are TINY and RANDOM (written by `python -m videobooth_core make-tiny`).\n"
            "They exercise the whole pipeline but generate noise. Real weights: see the README.\n"
        )
    logger.info("wrote the tiny model set to %s", out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tiny CLIP towers and VAE
# ----------------------------------------------------------------------------------------------------------------


def tiny_clip_text_config() -> transformers.CLIPTextConfig:
    """A tiny CLIP text config: width 32, 2 layers, 4 heads, MLP 64, 77 positions, CLIP's vocabulary size."""
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )


def tiny_clip_vision_config() -> transformers.CLIPVisionConfig:
    """A tiny CLIP vision config: width 32, 18 layers (``hidden_states[16]`` exists), 4 heads, 224 px, patch 14."""
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=18,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` kwargs of a tiny VAE with the SD layout: 4 levels (downscale 8), 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
    }


# ----------------------------------------------------------------------------------------------------------------
# Tiny BPE tokenizer
# ----------------------------------------------------------------------------------------------------------------

_END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character mapping (256 entries, in CLIP's vocabulary order), from
    transformers."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode as library_bytes_to_unicode
    except ImportError:  # transformers 4.x keeps it with the GPT-2 tokenizer
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode as library_bytes_to_unicode
    return dict(library_bytes_to_unicode())


class TinyTokenizerInfo(NamedTuple):
    """What :func:`write_tiny_tokenizer` wrote: vocabulary size and the special token ids."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int


_TINY_TOKENIZER_WORDS = (
    "a panda dog cat in the on pond beach park running playing sdksd none video tiny photo of and with is "
    "swimming walking sitting grass water man woman car road snow"
).split()


def _train_tiny_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """``num_merges`` BPE merges over ``words`` in CLIP's word convention (the last symbol carries ``</w>``),
    trained by the ``tokenizers`` library's ``BpeTrainer``: the most frequent pair first, ties alphabetically.

    The trainer breaks ties between equally frequent pairs by the ids of their symbols, and assigns those ids in
    the order of a hash map that changes from process to process. Every symbol the merges can form (each
    substring of each word, with ``</w>`` when it ends the word) is therefore given its id up front, in
    alphabetical order, as a special token of the trainer: ties then go alphabetically and the merges are the
    same in every process (and the same as those of the tokenizer the pinned test results were recorded with).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # the alphabet (each character, also those that only end words) and every symbol a merge can form
    symbols = sorted({char for word in words for char in word} | {
        word[i:j] + (_END_OF_WORD if j == len(word) else "")
        for word in words for i in range(len(word)) for j in range(i + 1, len(word) + 1)
    })
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=_END_OF_WORD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # merges reuse the ids given up front, so the vocabulary never grows: training runs until no pair is left
    trainer = trainers.BpeTrainer(vocab_size=len(symbols) + 1, min_frequency=0, show_progress=False,
                                  special_tokens=symbols, end_of_word_suffix=_END_OF_WORD)
    tokenizer.train_from_iterator(words, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers < 0.20 writes each merge as one "a b" string, later versions as a pair
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in merges[:num_merges]]


def write_tiny_tokenizer(folder: PathLike, num_merges: int = 48) -> TinyTokenizerInfo:
    """Write a small CLIP-style BPE tokenizer of our own (not a copy of the CLIP vocabulary) into ``folder``.

    ``vocab.json``: the 256 byte-level characters of :func:`bytes_to_unicode`, the same with ``</w>``, the merged
    symbols of ``num_merges`` merges trained on a fixed list of common words, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the last two ids (the layout of CLIP's vocabulary). Also ``merges.txt`` (with the
    ``#version: 0.2`` header), ``tokenizer_config.json`` (model_max_length 77, pad ``<|endoftext|>``,
    lower-casing) and ``special_tokens_map.json``. Any text tokenises into ids below the vocabulary size. The
    folder appears atomically (written beside it, then renamed); an existing folder of that name is replaced.

    Returns:
        ``TinyTokenizerInfo(vocab_size, bos_token_id, eos_token_id)``.
    """
    byte_chars = list(bytes_to_unicode().values())
    merges = _train_tiny_merges(_TINY_TOKENIZER_WORDS, num_merges)
    tokens = byte_chars + [c + _END_OF_WORD for c in byte_chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    with atomic_path(folder, folder=True) as out:
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return TinyTokenizerInfo(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"])


# ----------------------------------------------------------------------------------------------------------------
# Tiny metric models (evaluation): a full CLIP and a DINO ViT, each a transformers folder with its processor
# ----------------------------------------------------------------------------------------------------------------
METRIC_CLIP_DIR = "clip_eval/videobooth_tiny_clip"
METRIC_DINO_DIR = "dino/videobooth_tiny_dino"
METRIC_IMAGE_SIZE = 32


def write_tiny_metric_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny full CLIP (both towers, projections, the tiny tokenizer, an image processor at 32 px) and a
    tiny DINO ViT (32 px, patch 8) as transformers folders; the global random state is left untouched."""
    import transformers

    out = Path(out_dir)
    size = METRIC_IMAGE_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        clip = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, projection_dim=16),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=size, patch_size=8, projection_dim=16),
            projection_dim=16)).eval()
        dino = transformers.ViTModel(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=size,
            patch_size=8), add_pooling_layer=False).eval()
    clip_dir, dino_dir = out / METRIC_CLIP_DIR, out / METRIC_DINO_DIR
    for folder in (clip_dir, dino_dir):
        folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(clip_dir, folder=True) as tmp:
        clip.save_pretrained(tmp)
        write_tiny_tokenizer(tmp / "tokenizer")  # written beside the model files, then moved up: one folder
        for file in list((tmp / "tokenizer").iterdir()):
            file.replace(tmp / file.name)
        (tmp / "tokenizer").rmdir()
        transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                        crop_size={"height": size, "width": size}).save_pretrained(tmp)
    with atomic_path(dino_dir, folder=True) as tmp:
        dino.save_pretrained(tmp)
        transformers.ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp)
    return clip_dir, dino_dir


def write_tiny_lora(path: str | Path, seed: int = 0) -> Path:
    """A kohya LoRA (rank 2, alpha 2) on two spatial layers of the tiny UNet (self-attention query and feed-forward
    output of the first down block), written atomically; the global random state is left untouched."""
    from safetensors.torch import save_file

    with torch.device("meta"):  # only the layer shapes are needed
        unet = UNet3DModel(TINY_UNET)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"):
        out_features, in_features = unet.get_submodule(name).weight.shape
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(2, in_features, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(out_features, 2, generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp))
    return target
