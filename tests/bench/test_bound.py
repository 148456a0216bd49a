"""The arithmetic bound and the mixed workload of the throughput benchmark (pure parts, CPU)."""
from bench.bound import Shapes, flops_per_image
from bench.data import MIXED_SIZES, OUTPUT_LENGTHS, mixed_size, output_length, write_mixed_images
from raylens.checkpoints.formats import read_model_spec

# The InternVL2-2B shape (InternViT-300M + InternLM2-1.8B), as raylens.checkpoints.tiny builds it.
TWO_B = Shapes(vit_hidden=1024, vit_intermediate=4096, vit_layers=24, vit_tokens=1025, patch_pixels=588, merged=4,
               tokens_per_tile=256, hidden=2048, intermediate=8192, layers=24, kv_width=1024, vocab=92553)


def test_shapes_are_read_from_a_checkpoint(tiny_checkpoint):
    shapes = Shapes.from_dir(tiny_checkpoint)
    spec = read_model_spec(tiny_checkpoint)
    assert shapes.tokens_per_tile == spec.image_tokens_per_tile
    assert shapes.vit_tokens == (spec.tile_size // spec.patch_size) ** 2 + 1


def test_one_more_new_token_costs_twice_the_llm_matmul_weights_plus_attention():
    s = TWO_B
    weights = s.layers * (2 * s.hidden**2 + 2 * s.hidden * s.kv_width + 3 * s.hidden * s.intermediate) + s.hidden * s.vocab
    step = flops_per_image(s, tiles=1, text_tokens=30, new_tokens=65) - flops_per_image(s, tiles=1, text_tokens=30, new_tokens=64)
    attention = 2 * s.layers * 2 * (256 + 30 + 64.5) * s.hidden  # over the context at that step, on average
    assert abs(step - (2 * weights + attention)) / step < 0.01


def test_flops_grow_with_tiles_roughly_linearly():
    one = flops_per_image(TWO_B, tiles=1, text_tokens=30, new_tokens=64)
    thirteen = flops_per_image(TWO_B, tiles=13, text_tokens=30, new_tokens=64)
    assert 1.7e12 < one < 2.0e12  # ~0.7 TFLOP of vision, ~1.1 of language model
    assert 9 < thirteen / one < 13  # vision and prefill scale with tiles; decode does not


def test_mixed_workload_is_deterministic_and_covers_every_size_group(tmp_path):
    sizes = {mixed_size(i) for i in range(400)}
    for _, group in MIXED_SIZES:
        assert sizes & set(group)
    assert [mixed_size(i) for i in range(20)] == [mixed_size(i) for i in range(20)]
    lengths = [output_length(f"mix_{i:06d}.jpg") for i in range(500)]
    assert min(lengths) >= OUTPUT_LENGTHS[0] and max(lengths) <= OUTPUT_LENGTHS[1]
    assert len(set(lengths)) > 60  # spread over the range, not a constant
    assert output_length("dir/mix_000001.jpg") == output_length("mix_000001.jpg")
    from PIL import Image

    paths = write_mixed_images(tmp_path, 5, processes=2)
    assert [Image.open(p).size for p in paths] == [mixed_size(i) for i in range(5)]
