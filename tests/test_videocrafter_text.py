"""VideoCrafter's text encoder (issue 26): an OpenCLIP text tower read at its penultimate layer through
``transformers.CLIPTextModel``. The reference is a tiny tower written the way ``open_clip``'s ``TextTransformer`` is
(``torch.nn.MultiheadAttention`` with the fused ``in_proj``, sequence-first, causal mask, exact GELU), run as
``FrozenOpenCLIPEmbedder(layer="penultimate")`` runs it (every block but the last, then ``ln_final``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from videobooth_core.conditioning import openclip_text
from videobooth_core.conditioning.openclip_text import (
    build_openclip_text_encoder,
    encode_penultimate,
    load_videocrafter_text_encoder,
    openclip_text_to_transformers,
    tokenize_openclip,
)
from videobooth_core.conditioning.tokenizer import load_clip_tokenizer
from videobooth_core.errors import CheckpointError

WIDTH, LAYERS, HEADS, VOCAB = 64, 3, 4, 49408


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(WIDTH, 4 * WIDTH))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipTextTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(77, WIDTH))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.empty(WIDTH, WIDTH))
        self.logit_scale = nn.Parameter(torch.ones([]))
        generator = torch.Generator().manual_seed(0)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2 if p.dim() > 1 else
                        torch.rand(p.shape, generator=generator) * 0.4 - 0.2 + (1.0 if p.dim() == 1 else 0.0))

    def penultimate(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.full((77, 77), float("-inf")).triu(1)
        x = (self.token_embedding(ids) + self.positional_embedding).permute(1, 0, 2)
        for block in self.transformer.resblocks[:-1]:
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))


@pytest.fixture(scope="module")
def tower() -> _OpenClipTextTower:
    return _OpenClipTextTower().eval()


def test_tokens_are_padded_with_zeros_and_a_long_prompt_keeps_its_end_token(clip_tokenizer_dir: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    with caplog.at_level(logging.WARNING):
        ids = tokenize_openclip(tokenizer, ["a panda", "", "panda " * 75 + "playing guitar"])
    # the cut is said once, for the long prompt, naming its length and the words the model will not see
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == openclip_text.__name__]
    assert len(warnings) == 1 and "is 79 tokens" in warnings[0] and "('playing guitar' is not" in warnings[0], warnings
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0, :4].tolist() == [49406, 320, 12952, 49407] and ids[0, 4:].eq(0).all()
    assert ids[1, :2].tolist() == [49406, 49407] and ids[1, 2:].eq(0).all()
    assert ids[2, 0] == 49406 and ids[2, -1] == 49407 and ids[2, 1:-1].eq(12952).all()


def test_the_penultimate_context_matches_an_open_clip_style_tower(tower: _OpenClipTextTower,
                                                                   clip_tokenizer_dir: Path) -> None:
    ids = tokenize_openclip(load_clip_tokenizer(clip_tokenizer_dir), ["a panda eating bamboo", ""])
    checkpoint = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
    model = build_openclip_text_encoder(tower.state_dict(), source="tower", num_attention_heads=HEADS)
    with torch.no_grad():
        expected = tower.penultimate(ids)
    ours = encode_penultimate(model, ids)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the last block is skipped: the full-depth output differs
    with torch.no_grad():
        full = model(ids).last_hidden_state
    assert (full - ours).abs().max() > 1e-2
    # through the checkpoint's cond_stage_model.model.* (heads come from the width there: ViT-H's 1024 is 16 heads,
    # this tiny 64 reads as 1, so only the keys are compared)
    loaded = load_videocrafter_text_encoder(checkpoint, source="model.ckpt")
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_the_key_table_agrees_with_diffusers_open_clip_converter(tower: _OpenClipTextTower) -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model = build_openclip_text_encoder(tower.state_dict(), source="tower", num_attention_heads=HEADS)
    checkpoint = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
    theirs = convert_open_clip_checkpoint(model, checkpoint)
    ours = openclip_text_to_transformers(tower.state_dict())
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items() if "position_ids" not in k}
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_a_checkpoint_without_its_text_encoder_says_which_file_to_get() -> None:
    with pytest.raises(CheckpointError, match=r"no text encoder \('cond_stage_model\.model\.\*'\).*clip_h"):
        load_videocrafter_text_encoder({"model.diffusion_model.x": torch.zeros(1)}, source="model.ckpt")


def test_the_image_encoder_matches_an_open_clip_style_visual_tower() -> None:
    """I2V: ``embedder.model.visual.*`` through ``CLIPVisionModel`` gives the official embedder's tokens (conv1,
    class token, positions, ln_pre, every block; no ln_post, no proj)."""
    from videobooth_core.conditioning.openclip_text import build_openclip_vision_encoder

    generator = torch.Generator().manual_seed(1)
    visual = nn.Module()
    visual.conv1 = nn.Conv2d(3, WIDTH, 14, stride=14, bias=False)
    visual.class_embedding = nn.Parameter(torch.randn(WIDTH, generator=generator) * 0.1)
    visual.positional_embedding = nn.Parameter(torch.randn(257, WIDTH, generator=generator) * 0.1)
    visual.ln_pre = nn.LayerNorm(WIDTH)
    visual.transformer = nn.Module()
    visual.transformer.resblocks = nn.ModuleList(_Block() for _ in range(2))
    visual.ln_post = nn.LayerNorm(WIDTH)
    visual.proj = nn.Parameter(torch.randn(WIDTH, 16, generator=generator))
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    pixels = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, WIDTH), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x).permute(1, 0, 2)
        for block in visual.transformer.resblocks:
            x = block(x, None)
        expected = x.permute(1, 0, 2)
        model = build_openclip_vision_encoder(visual.state_dict(), source="visual", num_attention_heads=HEADS)
        ours = model(pixels).last_hidden_state
    assert ours.shape == (2, 257, WIDTH)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
