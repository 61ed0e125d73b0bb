"""Prompt handling and subject-token replacement (the coarse image-prompt embedding).

As the official pipeline does, the prompt is lower-cased and the subject word replaced by the placeholder
``sdksd`` (3 CLIP BPE tokens); the placeholder's token embeddings are then replaced by the mapper's 5
word vectors *before* position embeddings, the rest of the sequence shifting right (truncated at 77).
The trained weights expect exactly this sequence, including the positions of every later token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PromptError

PLACEHOLDER_WORD = "sdksd"
NULL_PROMPT = "None"
"""The official unconditional prompt is the literal string "None", not the empty string."""
MAX_TOKENS = 77


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt ready for encoding: ``input_ids`` (1, 77) int64 and the placeholder's token ids."""

    text: str
    """The prompt as tokenised (lower-cased, subject word replaced by the placeholder)."""
    input_ids: torch.Tensor
    placeholder_ids: tuple[int, ...]


def substitute_subject(prompt: str, subject_word: str) -> str:
    """Lower-case ``prompt`` and replace every occurrence of ``subject_word`` by the placeholder.

    Replacement is a plain substring replacement, as the official code does ("pandas" → "sdksds").
    Raises PromptError if the word is empty or not in the prompt.
    """
    word = subject_word.strip().lower()
    if not word:
        raise PromptError("the subject word is empty; give the word of the prompt that names the subject, e.g. 'dog'")
    lowered = prompt.lower()
    if word not in lowered:
        words = re.findall(r"[\w'-]+", lowered)
        raise PromptError(
            f"the subject word {subject_word!r} is not in the prompt {prompt!r}; "
            f"use one of the prompt's words: {', '.join(repr(w) for w in dict.fromkeys(words)) or '(none)'}"
        )
    return lowered.replace(word, PLACEHOLDER_WORD)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """CLIP token ids padded with end-of-text to 77 and truncated: (1, 77) int64."""
    ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.long)


def prepare_subject_prompt(tokenizer: Any, prompt: str, subject_word: str) -> SubjectPrompt:
    """Substitute the placeholder and tokenise; errors if the placeholder falls past the 77-token limit."""
    text = substitute_subject(prompt, subject_word)
    ids = tokenize(tokenizer, text)
    placeholder = tuple(int(i) for i in tokenizer(PLACEHOLDER_WORD, add_special_tokens=False).input_ids)
    if not (ids[0] == placeholder[0]).any():
        raise PromptError(
            f"the subject word {subject_word!r} lies beyond CLIP's {MAX_TOKENS}-token limit in the prompt; "
            "shorten the prompt or mention the subject earlier"
        )
    return SubjectPrompt(text=text, input_ids=ids, placeholder_ids=placeholder)


def splice_subject_embeddings(
    token_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_ids: tuple[int, ...], injected: torch.Tensor
) -> torch.Tensor:
    """Replace the placeholder's token embeddings by the injected word vectors.

    Args:
        token_embeds: (b, 77, d) token embeddings (before position embeddings).
        input_ids: (b, 77) token ids; every position holding ``placeholder_ids[0]`` starts a splice.
        placeholder_ids: the n token ids of the placeholder word.
        injected: (b, k, d) word vectors from the mapper.

    Returns:
        (b, 77, d): prefix, the k vectors, then the tokens after the placeholder (shifted by k - n and
        truncated to 77; when n > k the sequence is refilled from its own end), exactly as the official code.
    """
    total = token_embeds.shape[1]
    n, k = len(placeholder_ids), injected.shape[1]
    out = token_embeds.clone()
    for b in range(token_embeds.shape[0]):
        for start in torch.nonzero(input_ids[b] == placeholder_ids[0]).flatten().tolist():
            end = start + n - 1
            if start + k < total:
                if n <= k:
                    out[b, start + k:] = token_embeds[b, end + 1: end + 1 + total - start - k]
                else:
                    out[b, start + k:] = torch.cat([token_embeds[b, end + 1:], token_embeds[b, total - (n - k):]])
            written = min(k, total - start)
            out[b, start: start + written] = injected[b, :written].to(out.dtype)
    return out


@dataclass
class TextEncoding:
    """Text states and the intermediates the parity tests check."""

    last_hidden_state: torch.Tensor
    """(b, 77, d) after the final layer norm: the UNet's text context."""
    inputs_embeds: torch.Tensor
    """(b, 77, d) token embeddings after the splice, before position embeddings."""
    embeddings: torch.Tensor
    """(b, 77, d) with position embeddings (input of the first layer)."""


def encode_text(
    text_model: Any,
    input_ids: torch.Tensor,
    injected: torch.Tensor | None = None,
    placeholder_ids: tuple[int, ...] | None = None,
) -> TextEncoding:
    """Encode token ids with a transformers ``CLIPTextModel``, splicing ``injected`` over the placeholder.

    Args:
        text_model: ``transformers.CLIPTextModel`` (4.x or 5.x layout).
        input_ids: (b, 77) int64.
        injected: (b, k, d) mapper word vectors, or None for a plain encoding.
        placeholder_ids: the placeholder's token ids (required with ``injected``).

    Returns:
        :class:`TextEncoding`; a causal mask and no padding mask, final layer norm, no clip-skip.
    """
    transformer = getattr(text_model, "text_model", text_model)
    param = transformer.embeddings.token_embedding.weight
    input_ids = input_ids.to(param.device)
    tokens = transformer.embeddings.token_embedding(input_ids)
    if injected is not None:
        if placeholder_ids is None:
            raise ValueError("placeholder_ids are required to splice injected embeddings")
        tokens = splice_subject_embeddings(tokens, input_ids, placeholder_ids, injected.to(param.device))
    length = input_ids.shape[1]
    positions = torch.arange(length, device=param.device)[None]
    hidden = tokens + transformer.embeddings.position_embedding(positions)
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=param.device, dtype=hidden.dtype)
    causal = torch.triu(causal, diagonal=1)[None, None].expand(input_ids.shape[0], 1, length, length)
    encoded = transformer.encoder(inputs_embeds=hidden, attention_mask=causal)
    encoded = encoded[0] if isinstance(encoded, tuple) else encoded.last_hidden_state
    return TextEncoding(transformer.final_layer_norm(encoded), tokens, hidden)
