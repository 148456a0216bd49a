"""The arithmetic bound of a captioning workload: matmul FLOPs per image from a checkpoint's shapes.

Why: a throughput figure means little without the limit it is measured against. `flops_per_image` counts
the multiply-adds of every matrix product one request costs (vision encoder per tile, projector,
language-model prefill over the image and text tokens, one decode step per new token, attention over
the context), times 2. Divided into the GPU's measured bf16 matmul rate (`measure_bf16_tflops`, run on
the benchmark machine) it gives the images/s no engine can beat on that GPU. Decoding is memory-bound,
so real engines stay well under it; the table reports the share reached, not a target.

What it leaves out: normalisations, activations, softmax, rotary embeddings, sampling (all O(tokens x
hidden), under 1%), and the CPU side (decode, tiling).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shapes:
    vit_hidden: int
    vit_intermediate: int
    vit_layers: int
    vit_tokens: int  # patches + class token per tile
    patch_pixels: int  # 3 * patch * patch: the patch embedding's input width
    merged: int  # ViT tokens merged into one LLM token by the pixel shuffle (4 for ratio 0.5)
    tokens_per_tile: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # num_key_value_heads * head_dim
    vocab: int

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Shapes":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        vision = config["vision_config"]
        text = config.get("llm_config") or config["text_config"]
        image = vision["image_size"][0] if isinstance(vision["image_size"], list) else vision["image_size"]
        patch = vision["patch_size"][0] if isinstance(vision["patch_size"], list) else vision["patch_size"]
        ratio = float(config.get("downsample_ratio", 0.5))
        patches = (image // patch) ** 2
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        return cls(
            vit_hidden=vision["hidden_size"], vit_intermediate=vision["intermediate_size"],
            vit_layers=vision["num_hidden_layers"], vit_tokens=patches + 1, patch_pixels=3 * patch * patch,
            merged=round(1 / ratio**2), tokens_per_tile=int(patches * ratio**2),
            hidden=text["hidden_size"], intermediate=text["intermediate_size"], layers=text["num_hidden_layers"],
            kv_width=text.get("num_key_value_heads", heads) * head_dim, vocab=text["vocab_size"],
        )


def _llm_token_macs(s: Shapes, context: float) -> float:
    """One token through every LLM layer, attending to `context` earlier tokens (q, k, v, o, gated MLP)."""
    per_layer = s.hidden * s.hidden * 2 + 2 * s.hidden * s.kv_width + 3 * s.hidden * s.intermediate
    return s.layers * (per_layer + 2 * context * s.hidden)


def flops_per_image(s: Shapes, *, tiles: int, text_tokens: int, new_tokens: int) -> float:
    """Matmul FLOPs of one request: `tiles` image tiles (thumbnail included), `text_tokens` of prompt
    text around them, `new_tokens` generated."""
    vit_per_token = s.vit_layers * (4 * s.vit_hidden**2 + 2 * s.vit_hidden * s.vit_intermediate
                                    + 2 * s.vit_tokens * s.vit_hidden)
    vision = tiles * (s.vit_tokens * vit_per_token + (s.vit_tokens - 1) * s.patch_pixels * s.vit_hidden)
    wide = s.vit_hidden * s.merged
    projector = tiles * s.tokens_per_tile * (wide * s.hidden + s.hidden * s.hidden)
    prompt = tiles * s.tokens_per_tile + text_tokens
    prefill = prompt * _llm_token_macs(s, prompt / 2) + s.hidden * s.vocab
    decode = new_tokens * (_llm_token_macs(s, prompt + new_tokens / 2) + s.hidden * s.vocab)
    return 2.0 * (vision + projector + prefill + decode)


def bound_images_per_s(tflops: float | None, flops_per_image: float) -> float | None:
    """The images/s a GPU of `tflops` (measured bf16 rate) cannot beat at `flops_per_image`."""
    return round(tflops * 1e12 / flops_per_image, 1) if tflops else None


def measure_bf16_tflops(n: int = 8192, repeats: int = 20, rounds: int = 5) -> float | None:
    """The GPU's dense bf16 matmul rate, measured (None without CUDA): the best of `rounds`, because a round
    that shares the GPU (a previous run's engine still exiting) is slower and the GPU's rate is not."""
    import time

    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12)
    return round(best, 1)


if __name__ == "__main__":
    print(json.dumps({"bf16_tflops": measure_bf16_tflops()}))
