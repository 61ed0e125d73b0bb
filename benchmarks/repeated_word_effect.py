"""A subject word that occurs twice in a caption: how far apart are the two splices' text states?

The official training splices the mapper's 5 word vectors over the class word itself (one token for "dog"), at
the caption's original positions: the second splice overwrites the last vectors of the first. The inference splice
(``sdksd``, 3 CLIP tokens, which the trainer used before issue 28) gives another sequence. For each caption this
prints how many of the 77 text states differ between the two (above 1e-6), the largest difference and the relative
difference ``||official - placeholder|| / ||official||`` of the states; a caption naming its word once gives 0.

Tokenizer: the real CLIP BPE (``tests/fixtures/clip_tokenizer``). Text encoders, random weights (seeded): the tiny
one of ``make-tiny`` (2 layers, width 32) and one of CLIP ViT-L/14's text size (12 layers, width 768, transformers'
initialisation); the word vectors are random with the spread of the token embeddings.

    python benchmarks/repeated_word_effect.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videobooth_core.conditioning.text import encode_text, prepare_subject_prompt, tokenize  # noqa: E402

CAPTIONS = (("a dog chasing another dog", "dog"), ("a dog running on the beach", "dog"),
            ("a cat sitting next to a cat toy", "cat"))


def text_encoders(seed: int) -> dict[str, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel

    from videobooth_core.app.tiny import make_tiny
    from videobooth_core.loading.clip import load_clip_text_encoder

    folder = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny(folder, seed=seed)
    tiny = load_clip_text_encoder(next((folder / "text_encoders").glob("*clip_text*.safetensors"))).eval()
    torch.manual_seed(seed)
    large = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12, projection_dim=768)).eval()
    return {"tiny (2 layers, width 32)": tiny, "ViT-L/14 text size (12 layers, width 768)": large}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" /
                                                  "clip_tokenizer"))
    results = []
    for name, encoder in text_encoders(args.seed).items():
        table = getattr(encoder, "text_model", encoder).embeddings.token_embedding.weight
        generator = torch.Generator().manual_seed(args.seed)
        injected = torch.randn((1, 5, table.shape[1]), generator=generator) * float(table.detach().std())
        for caption, word in CAPTIONS:
            word_ids = tuple(tokenizer(word, add_special_tokens=False).input_ids)
            with torch.no_grad():
                official = encode_text(encoder, tokenize(tokenizer, caption), injected, word_ids).last_hidden_state
                subject = prepare_subject_prompt(tokenizer, caption, word)
                ours = encode_text(encoder, subject.input_ids, injected, subject.placeholder_ids).last_hidden_state
            diff = (official - ours).abs().amax(dim=-1)[0]
            positions = [int(i) for i in torch.nonzero(diff > 1e-6).flatten()]
            results.append({"encoder": name, "caption": caption, "word": word,
                            "positions_differing": len(positions),
                            "first_differing": positions[0] if positions else None,
                            "max_abs": float(diff.max()),
                            "relative": float((official - ours).norm() / official.norm())})
            print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
