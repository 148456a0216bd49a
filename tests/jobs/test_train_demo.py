"""The demo model's training goes through jobs.finetune (one training loop), with the semantics of the plain
loop it replaced: the same examples (the caption prompt, loss on the caption and `<|im_end|>`), the same
optimiser and schedule, so the same losses step for step."""
from __future__ import annotations

import json
import math

import pytest
import torch

from jobs.train_demo import ADAM_BETA2, MIN_LR_RATIO, ShapesCaptionStream, main
from raylens.checkpoints.formats import ModelSpec
from raylens.checkpoints.loading import load_hf_model
from raylens.demo import shapes
from raylens.images import pixel_values_for, prepare_image
from raylens.prompts import DEFAULT_CAPTION_PROMPT, build_prompt, expand_image_placeholders

pytestmark = pytest.mark.slow  # Ray Train runs: tens of seconds on 2 cores

STEPS, BATCH, WARMUP, LR = 3, 4, 2, 1e-3


def _reference_losses(init_dir, seed: int) -> list[float]:
    """The demo trainer's former stage 2, written out plainly: prompt + caption strings tokenised whole, labels
    from the prompt's length, AdamW (decay on matrices only), warm-up then cosine to 5%, clip 1."""
    model, tokenizer, spec = load_hf_model(init_dir)
    model.train()
    tiling = spec.tiling()
    template = spec.chat_template()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.01), dict(params=rest, weight_decay=0.0)],
                                  lr=LR, betas=(0.9, ADAM_BETA2))
    stream = shapes.iter_samples(seed, "train")
    losses = []
    for step in range(STEPS):
        rows, tiles = [], []
        for image, caption, _ in (next(stream) for _ in range(BATCH)):
            pixels = torch.from_numpy(pixel_values_for(prepare_image(image, tiling), tiling))
            tokens = [spec.image_tokens(pixels.shape[0])]
            prompt = tokenizer(expand_image_placeholders(build_prompt(template, DEFAULT_CAPTION_PROMPT), tokens))["input_ids"]
            full = tokenizer(expand_image_placeholders(
                build_prompt(template, DEFAULT_CAPTION_PROMPT, answer=caption), tokens))["input_ids"]
            assert full[: len(prompt)] == prompt
            rows.append((full, [-100] * len(prompt) + full[len(prompt):]))
            tiles.append(pixels)
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((BATCH, width), -100)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)], labels[r, : len(lab)], mask[r, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
        if step < WARMUP:
            lr = LR * (step + 1) / WARMUP
        else:
            progress = (step - WARMUP) / max(1, STEPS - WARMUP)
            lr = LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=torch.cat(tiles)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_stream_is_the_shapes_train_split_in_order():
    stream = ShapesCaptionStream(seed=3)
    expected = [attrs for _, _, attrs in shapes.generate_dataset(6, 3, split="train")]
    assert [stream.attributes(i) for i in (0, 1, 4, 5)] == [expected[i] for i in (0, 1, 4, 5)]
    assert stream.attributes(2) == expected[2]  # going back restarts the stream
    assert ShapesCaptionStream(3).num_records is None


def test_demo_training_runs_through_finetune_with_the_plain_loops_losses(tmp_path, ray_local):
    work, out = tmp_path / "work", tmp_path / "model"
    torch.set_num_threads(1)
    main(["--out", str(out), "--vision-steps", "2", "--vision-batch-size", "4", "--steps", str(STEPS),
          "--batch-size", str(BATCH), "--warmup", str(WARMUP), "--lr", str(LR), "--log-every", "1", "--threads", "1",
          "--loader-workers", "0", "--eval-images", "4", "--run-dir", str(work), "--seed", "5"])
    history = [json.loads(line) for line in (work / "run" / f"checkpoint_{STEPS:06d}" / "metrics.jsonl").open()]
    expected = _reference_losses(work / "init", seed=5)
    assert [m["loss"] for m in history] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    spec = ModelSpec.from_dir(out)
    assert (spec.format, spec.template, spec.tile_size, spec.max_tiles) == ("internvl_chat", "Hermes-2", 112, 2)
    assert "through `jobs.finetune`" in (out / "TRAINING.md").read_text()
    assert not (out / "raylens_finetune.json").exists()
