"""Train the shipped demo model: a tiny InternVL2-architecture captioner for `raylens.demo.shapes` images.

Exact command that produced `raylens/demo/model` (2 CPU cores; its TRAINING.md gives time and scores):

    python -m jobs.train_demo --out raylens/demo/model --vision-steps 700 --steps 1500 --seed 0 --eval-every 500

What it does, in order:
1. builds a small byte-level BPE tokenizer on every caption word, the default caption prompt and the
   InternVL system message (so sequences stay short), and a random InternVL model from `--seed`
   (`raylens.checkpoints.tiny.build_hf_model`, Qwen2-style LLM, 112-px tiles, 16 image tokens a tile),
   with the ViT's patch position embeddings started from 2-D sin-cos codes;
2. stage 1 (`--vision-steps`): trains the vision tower alone to name the shape, through a temporary linear
   head that is then dropped (see `warm_up_vision` for why): an initialisation, with an objective of its own;
3. stage 2 (`--steps`): full fine-tuning of the whole model on captions through `jobs.finetune`, the same
   Ray Train loop LoRA fine-tunes use (one CPU worker with `--threads` threads), on an endless stream of
   freshly drawn `"train"`-split shapes (`ShapesCaptionStream`): AdamW, warm-up + cosine to 5%. Every example
   is built by the fine-tuning data path, which is inference's: `raylens.images` tiling with the checkpoint's
   tiling numbers, the checkpoint's template and system message around `DEFAULT_CAPTION_PROMPT`, `<image>`
   expanded to `num_tiles * 16` image tokens; the loss covers only the caption and the closing `<|im_end|>`;
4. `jobs.merge` writes the final checkpoint in the original InternVL2 hub format (`--save-dtype`), which is
   reloaded through the path users get (`raylens.checkpoints.loading.load_hf_model`) to report greedy
   exact-match accuracy on freshly generated `"held_out"` images, a split training never draws from;
   TRAINING.md is written beside the weights.

Reproducible: all randomness comes from `--seed` (the weights through `build_hf_model`'s own generator,
the data through `raylens.demo.shapes` streams; there is no dropout); on the same torch build and thread
count the loss curve repeats exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from raylens.demo import shapes
from raylens.prompts import (
    DEFAULT_CAPTION_PROMPT,
    INTERNVL_SYSTEM_MESSAGE,
    build_prompt,
    expand_image_placeholders,
    get_template,
)

TEMPLATE = "Hermes-2"
ADAM_BETA2 = 0.98
MIN_LR_RATIO = 0.05  # the cosine ends at 5% of the peak


@dataclass(frozen=True)
class DemoDims:
    """Model and tiling numbers of the demo checkpoint (saved into its config.json)."""

    tile_size: int = 112  # patch 14 -> 8x8 patches -> pixel shuffle 0.5 -> 16 image tokens a tile
    patch_size: int = 14
    max_tiles: int = 2  # saved as max_dynamic_patch: 1:1, 4:3, 3:4 images are 1 tile; 2:1 is 2 + thumbnail
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    llm_hidden: int = 128
    llm_layers: int = 3
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 384
    vocab_size: int = 512  # an upper bound: the BPE stops merging when the corpus runs out

    @property
    def image_tokens_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2 // 4


# --- tokenizer and model ---------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: what the model reads and writes, and nothing else."""
    template = get_template(TEMPLATE)
    prompts = [build_prompt(template, DEFAULT_CAPTION_PROMPT, answer=c) for c in shapes.all_captions()]
    return [INTERNVL_SYSTEM_MESSAGE, DEFAULT_CAPTION_PROMPT, *shapes.all_captions(), *prompts]


def build_demo_model(dims: DemoDims, seed: int):
    """A randomly initialised demo model and its tokenizer (same seed, same weights)."""
    from raylens.checkpoints.tiny import build_hf_model
    from raylens.checkpoints.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_corpus(), vocab_size=dims.vocab_size, template=TEMPLATE)
    model, tokenizer = build_hf_model(
        "tiny",
        llm="qwen2",
        seed=seed,
        tokenizer=tokenizer,
        dtype=torch.float32,
        device="cpu",
        **_model_overrides(dims),
    )
    init_position_embeddings_2d(model)
    return model, tokenizer


def sincos_2d(grid: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position codes (x in the first half, y in the second), row-major."""
    if dim % 4:
        raise ValueError(f"the vision hidden size must be a multiple of 4 for 2-D sin-cos codes, got {dim}")
    quarter = dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def init_position_embeddings_2d(model) -> None:
    """Start the ViT's learned patch position embeddings from 2-D sin-cos codes (as MAE does).

    Why: from random position embeddings a ViT this small has to discover the 8x8 patch layout before it can
    tell a circle from a square. On the earlier any-colour-on-any-colour data, the held-out shape accuracy of
    the vision tower alone after 1000 steps was ~40% without this start and ~80% with it (single runs, 2 CPU
    cores). They stay trainable; the CLS slot keeps its random init.
    """
    embeddings = model.model.vision_tower.embeddings.position_embeddings  # [1, 1 + grid*grid, hidden]
    grid = math.isqrt(embeddings.shape[1] - 1)
    embeddings[0, 1:] = sincos_2d(grid, embeddings.shape[2]).to(embeddings.dtype)


def _model_overrides(dims: DemoDims) -> dict:
    return dict(
        vision_config=dict(
            image_size=dims.tile_size,
            patch_size=dims.patch_size,
            hidden_size=dims.vision_hidden,
            num_hidden_layers=dims.vision_layers,
            num_attention_heads=dims.vision_heads,
            intermediate_size=dims.vision_intermediate,
        ),
        text_config=dict(
            hidden_size=dims.llm_hidden,
            num_hidden_layers=dims.llm_layers,
            num_attention_heads=dims.llm_heads,
            num_key_value_heads=dims.llm_kv_heads,
            intermediate_size=dims.llm_intermediate,
        ),
    )


# --- examples, built as inference builds them ------------------------------------------------------


def tiling_spec(dims: DemoDims):
    from raylens.images import TilingSpec

    return TilingSpec(tile_size=dims.tile_size, min_tiles=1, max_tiles=dims.max_tiles, use_thumbnail=True)


def prompt_ids(tokenizer, num_tiles: int, image_tokens_per_tile: int) -> list[int]:
    """Token ids of the caption prompt for one image of `num_tiles` tiles (what generation continues)."""
    prompt = build_prompt(get_template(TEMPLATE), DEFAULT_CAPTION_PROMPT)
    prompt = expand_image_placeholders(prompt, [num_tiles * image_tokens_per_tile])
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# --- greedy captioning (the check) -----------------------------------------------------------------


@torch.inference_mode()
def caption_images(model, tokenizer, spec, image_tokens_per_tile: int, images, *, batch_size: int = 50,
                   max_new_tokens: int = 24) -> list[str]:
    """Greedy captions, batched with left padding, cut at the template's stop words."""
    from raylens.engines.encoding import left_padded
    from raylens.images import pixel_values_for, prepare_image

    template = get_template(TEMPLATE)
    vocab = tokenizer.get_vocab()
    stop_ids = [vocab[w] for w in template.stop_words if w in vocab]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    param = next(model.parameters())
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tiles, rows = [], []
        for image in chunk:
            prepared = prepare_image(image, spec)
            pv = torch.as_tensor(np.asarray(pixel_values_for(prepared, spec)))
            tiles.append(pv)
            rows.append(prompt_ids(tokenizer, pv.shape[0], image_tokens_per_tile))
        input_ids, attention_mask = left_padded(rows, pad)
        width = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(param.device),
            attention_mask=attention_mask.to(param.device),
            pixel_values=torch.cat(tiles).to(param.device, param.dtype),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad,
        )
        for tokens in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
            out.append(tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip())
    return out


def held_out_accuracy(model, tokenizer, spec, image_tokens_per_tile: int, n: int, seed: int) -> tuple[float, list]:
    samples = shapes.held_out_dataset(n, seed)
    predictions = caption_images(model, tokenizer, spec, image_tokens_per_tile, [s[0] for s in samples])
    errors = [(c, p) for (_, c, _), p in zip(samples, predictions) if p != c]
    return 1.0 - len(errors) / n, errors


# --- training --------------------------------------------------------------------------------------


def _adamw(named_parameters, args: argparse.Namespace) -> torch.optim.AdamW:
    """Stage 1's optimiser: fine-tuning's AdamW (decay on matrices only) with the demo's beta2."""
    from raylens.training.optim import adamw

    return adamw(named_parameters, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, ADAM_BETA2))


def _lr_at(step: int, steps: int, args: argparse.Namespace) -> float:
    from raylens.training.optim import lr_at

    return lr_at(step, steps, args.lr, args.warmup, MIN_LR_RATIO)


def _optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters, lr: float, clip: float) -> None:
    """One stage-1 update, as the fine-tuning loop does it: set the scheduled lr, backward, clip, step."""
    from raylens.training.optim import set_lr

    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()


class _Clock:
    """Wall and process-CPU seconds since creation (CPU time is what contention for the cores does not change)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __str__(self) -> str:
        return f"wall {time.perf_counter() - self.wall:5.0f}s  cpu {time.process_time() - self.cpu:5.0f}s"


def warm_up_vision(model, args: argparse.Namespace, dims: DemoDims) -> float:
    """Stage 1: train the vision tower alone to name the shape; returns the mean loss of the last log window.

    Why: captioning gradients teach colours first (a mean over patches is enough) and, at this size, take
    thousands of steps to start separating shapes, which needs the patch layout. On the earlier any-colour
    data (single runs, 2 CPU cores), a ViT trained on the shape alone got there in about 1000 steps, one
    trained on shape and colours together (what captioning asks) had only reached 51% after 2000, and
    captioning from scratch was at 29% after 1200 steps. So the tower first learns shapes through a
    temporary linear head on its mean-pooled patch features; the head is thrown away and nothing of it is
    saved. Images are whole-image single tiles (the thumbnail view) from the "warmup" split.
    """
    from raylens.images import TilingSpec, pixel_values_for, prepare_image

    vision = model.model.vision_tower
    generator = torch.Generator().manual_seed(args.seed)
    head = torch.nn.Linear(dims.vision_hidden, len(shapes.SHAPES))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=generator)
        head.bias.zero_()
    labels = {name: i for i, name in enumerate(shapes.SHAPES)}
    single = TilingSpec(tile_size=dims.tile_size, min_tiles=1, max_tiles=1, use_thumbnail=True)
    stream = shapes.iter_samples(args.seed, "warmup")
    optimizer = _adamw([*vision.named_parameters(), *head.named_parameters()], args)
    clock, losses = _Clock(), []
    checks = shapes.held_out_dataset(200, args.eval_seed)
    check_pixels = torch.cat([torch.from_numpy(pixel_values_for(prepare_image(image, single), single))
                              for image, _, _ in checks])
    check_target = torch.tensor([labels[attrs.shape] for _, _, attrs in checks])
    vision.train()
    for step in range(args.vision_steps):
        samples = [next(stream) for _ in range(args.vision_batch_size)]
        pixel_values = torch.cat([torch.from_numpy(pixel_values_for(prepare_image(image, single), single))
                                  for image, _, _ in samples])
        target = torch.tensor([labels[attrs.shape] for _, _, attrs in samples])
        features = vision(pixel_values=pixel_values).last_hidden_state[:, 1:].mean(dim=1)  # patches, not CLS
        loss = torch.nn.functional.cross_entropy(head(features), target)
        _optimizer_step(optimizer, loss, vision.parameters(), _lr_at(step, args.vision_steps, args), args.clip)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vision_steps:
            recent = losses[-args.log_every :]
            vision.eval()
            with torch.no_grad():
                predicted = head(vision(pixel_values=check_pixels).last_hidden_state[:, 1:].mean(dim=1)).argmax(-1)
            vision.train()
            accuracy = (predicted == check_target).float().mean().item()
            print(f"vision step {step + 1:5d}/{args.vision_steps}  shape loss {sum(recent) / len(recent):.4f}  "
                  f"held-out shape accuracy {accuracy:.2f}  {clock}", flush=True)
    recent = losses[-args.log_every :]
    return sum(recent) / len(recent) if recent else float("nan")


@dataclass
class ShapesCaptionStream:
    """Stage 2's data: the endless `"train"` split of `raylens.demo.shapes`, each image asked for its caption.

    A `raylens.training.loader.SampleSource`: position k is the k-th sample of the stream (no epochs, no
    shuffling), so a run is fixed by its seed. Reading is sequential; a loader process that skips ahead
    draws (but does not draw pixels for) the samples in between.
    """

    seed: int
    num_records = None  # endless

    def __post_init__(self) -> None:
        self._rng, self._next = None, 0

    def __getstate__(self) -> dict:
        return {"seed": self.seed}  # a fresh stream in every process

    def __setstate__(self, state: dict) -> None:
        self.seed = state["seed"]
        self.__post_init__()

    def record_id(self, index: int) -> str:
        return f"shapes/train/{self.seed}/{index}"

    def attributes(self, index: int) -> shapes.ShapeAttributes:
        if self._rng is None or index < self._next:
            self._rng, self._next = shapes.split_rng(self.seed, "train"), 0
        while self._next < index:
            shapes.sample_attributes(self._rng)
            self._next += 1
        self._next += 1
        return shapes.sample_attributes(self._rng)

    def encode(self, index: int, encoder):
        from raylens.images import prepare_image
        from raylens.conversation import Conversation, Turn
        from raylens.training.records import TrainingRecord

        attrs = self.attributes(index)
        record = TrainingRecord(self.record_id(index), Conversation((Turn(DEFAULT_CAPTION_PROMPT, 1, attrs.caption()),)))
        image = prepare_image(shapes.render(attrs), encoder.tiling())
        return encoder.encode(record, images=[image])


@dataclass
class HeldOutCheck:
    """Stage 2's step hook: caption 100 held-out images every `every` steps (before the last) and print the score."""

    every: int
    total: int
    seed: int

    def __call__(self, step: int, model, tokenizer, spec) -> None:
        if not self.every or step % self.every or step >= self.total:
            return
        model.eval()
        tiling = spec.tiling()
        accuracy, _ = held_out_accuracy(model, tokenizer, tiling, spec.image_tokens_per_tile, 100, self.seed)
        model.train()
        print(f"caption step {step:5d}  held-out accuracy {accuracy:.2f} (100 images, fp32, not saved)", flush=True)


def finetune_config(args: argparse.Namespace, init_dir: Path, run_dir: Path):
    """Stage 2 as a jobs.finetune run: full fine-tuning of the stage-1 model on one CPU worker."""
    from jobs.finetune_config import FinetuneConfig

    return FinetuneConfig(
        data="raylens.demo.shapes (train split, endless)", output=str(run_dir), model=str(init_dir), full=True,
        workers=1, gpus_per_worker=0, cpus_per_worker=args.threads, threads=args.threads,
        loader_workers=args.loader_workers, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup, min_lr_ratio=MIN_LR_RATIO, weight_decay=args.weight_decay,
        adam_beta2=ADAM_BETA2, clip=args.clip, dtype="float32", seed=args.seed, save_every=args.steps, keep=1,
        log_every=args.log_every, report_every=args.log_every, overwrite=True,
    )


def train(args: argparse.Namespace, dims: DemoDims, work_dir: Path) -> dict:
    """Both stages; returns the run's figures and the path of the final checkpoint."""
    from jobs.finetune import main as finetune_main
    from jobs.finetune import setup as finetune_setup
    from raylens.training.checkpoint import HISTORY_FILE, latest_checkpoint
    from raylens.training.loop import read_history

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = build_demo_model(dims, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}  vocab: {len(tokenizer)}  dims: {asdict(dims)}", flush=True)
    clock = _Clock()
    vision_loss = warm_up_vision(model, args, dims) if args.vision_steps else float("nan")
    init_dir = save(model, tokenizer, work_dir / "init", dims, torch.float32)  # exact: float32, as trained
    stage1_wall, stage1_cpu = time.perf_counter() - clock.wall, time.process_time() - clock.cpu
    plan = finetune_setup(finetune_config(args, init_dir, work_dir / "run"), source=ShapesCaptionStream(args.seed),
                          step_hook=HeldOutCheck(args.eval_every, args.steps, args.eval_seed))
    summary = finetune_main(plan)
    if summary["error"] or not summary["completed"]:
        raise SystemExit(f"stage 2 failed: {summary['error']}")
    checkpoint = Path(latest_checkpoint(plan.out_fs, plan.out_root))
    history = read_history(str(checkpoint / HISTORY_FILE))
    recent = [m["loss"] for m in history[-args.log_every:]]
    return dict(model=model, tokenizer=tokenizer, n_params=n_params, vision_loss=vision_loss,
                final_loss=sum(recent) / len(recent), checkpoint=checkpoint, init_dir=init_dir,
                train_s=stage1_wall + history[-1]["elapsed_s"],
                train_cpu_s=stage1_cpu + history[-1]["worker_cpu_s"])


def save(model, tokenizer, out: Path, dims: DemoDims, dtype: torch.dtype) -> Path:
    from raylens.checkpoints.tiny import save_original

    return save_original(model, tokenizer, out, template=TEMPLATE, max_tiles=dims.max_tiles,
                         llm_architecture="Qwen2ForCausalLM", dtype=dtype)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_training_md(out: Path, args: argparse.Namespace, dims: DemoDims, result: dict, accuracy: float,
                      errors: list) -> None:
    command = (f"python -m jobs.train_demo --out {args.out} --vision-steps {args.vision_steps} --steps {args.steps} "
               f"--seed {args.seed}"
               + "".join(f" --{k.replace('_', '-')} {v}" for k, v in _non_default_args(args).items()))
    text = f"""# Demo model: how it was trained

Command (from the repository root, {args.threads} CPU threads, torch {torch.__version__}):

    {command}

| | |
|---|---|
| stage 1: vision tower alone, names the shape | {args.vision_steps} steps x {args.vision_batch_size} `warmup`-split images, final shape loss {result['vision_loss']:.4f} (temporary linear head, not saved) |
| stage 2: whole model, captions | {args.steps} steps x {args.batch_size} `train`-split images (`raylens.demo.shapes`, seed {args.seed}), full fine-tuning through `jobs.finetune` (Ray Train, one CPU worker) |
| optimiser (both stages) | AdamW lr {args.lr} (warm-up {args.warmup}, cosine to 5%), weight decay {args.weight_decay}, clip {args.clip} |
| training time | {result['train_s'] / 60:.1f} min wall, {result['train_cpu_s'] / 60:.1f} CPU-minutes (wall time grows when other processes share the cores) |
| final caption loss (mean of the last {args.log_every} steps) | {result['final_loss']:.4f} |
| held-out exact-match accuracy | {accuracy:.1%} of {args.eval_images} `held_out`-split images (seed {args.eval_seed}), greedy, after saving in {args.save_dtype} and reloading with `load_hf_model` |
| parameters | {result['n_params']:,} |
| size on disk | {dir_size(out) / 2**20:.2f} MiB |

Architecture: InternVL2 (InternViT -> pixel shuffle 0.5 -> MLP -> Qwen2), template `{TEMPLATE}`,
{dims.tile_size}-px tiles ({dims.image_tokens_per_tile} image tokens a tile), max_dynamic_patch {dims.max_tiles} + thumbnail.
Vision: hidden {dims.vision_hidden}, {dims.vision_layers} layers, {dims.vision_heads} heads, MLP {dims.vision_intermediate}; patch position embeddings started from 2-D sin-cos codes.
LLM: hidden {dims.llm_hidden}, {dims.llm_layers} layers, {dims.llm_heads} heads ({dims.llm_kv_heads} KV), MLP {dims.llm_intermediate}, vocab {len(result['tokenizer'])} tokens (embedding rows {result['model'].config.text_config.vocab_size}).

It only knows captions of the form "a {{color}} {{shape}} on a {{background}} background." ("an" before a
vowel) for {len(shapes.COLORS)} colours ({', '.join(shapes.COLORS)}) and {len(shapes.SHAPES)} shapes
({', '.join(shapes.SHAPES)}). Its purpose is to make the pipeline's output checkable without downloading
weights, not to caption photos.
"""
    if errors:
        text += "\nHeld-out mistakes (expected -> got):\n\n" + "".join(f"* {c} -> {p}\n" for c, p in errors[:20])
    (out / "TRAINING.md").write_text(text)


def _non_default_args(args: argparse.Namespace) -> dict:
    defaults = vars(build_parser().parse_args(["--out", args.out]))
    skip = {"out", "vision_steps", "steps", "seed", "run_dir", "loader_workers"}  # the last two: no effect on weights
    return {k: v for k, v in vars(args).items() if k not in skip and v != defaults[k]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_demo",
        description="Train the tiny InternVL2-architecture demo captioner on synthetic shapes (CPU, minutes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("output")
    io.add_argument("--out", required=True, help="checkpoint directory to write (original InternVL2 format)")
    io.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the saved safetensors")
    run = parser.add_argument_group("training")
    run.add_argument("--vision-steps", type=int, default=700,
                     help="stage 1: steps training the vision tower alone to name the shape (0: skip)")
    run.add_argument("--vision-batch-size", type=int, default=32, help="stage 1 images per step")
    run.add_argument("--steps", type=int, default=1500, help="stage 2: captioning steps of the whole model")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training images")
    run.add_argument("--batch-size", type=int, default=16, help="stage 2 images per step")
    run.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    run.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    run.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    run.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    run.add_argument("--threads", type=int, default=2, help="torch CPU threads (timings in TRAINING.md use 2)")
    run.add_argument("--loader-workers", type=int, default=1,
                     help="stage 2 data loader processes (draw and tile images ahead of the step)")
    run.add_argument("--run-dir", default=None,
                     help="keep stage 2's jobs.finetune run (checkpoints, metrics.jsonl) here (default: a temporary directory)")
    run.add_argument("--log-every", type=int, default=100, help="print the mean loss every this many steps")
    run.add_argument("--eval-every", type=int, default=0,
                     help="also caption 100 held-out images every this many steps (0: only at the end)")
    check = parser.add_argument_group("held-out check (after saving)")
    check.add_argument("--eval-images", type=int, default=200, help="fresh held-out images to caption")
    check.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out split")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0 or args.vision_steps < 0 or args.vision_batch_size <= 0:
        raise SystemExit("--steps, --batch-size and --vision-batch-size must be positive, --vision-steps >= 0")
    dims = DemoDims()
    random.seed(args.seed)  # nothing here should use the global RNGs; this only pins anything that does
    np.random.seed(args.seed)

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="raylens-train-demo-") as tmp:
        work_dir = Path(tmp)
        if args.run_dir:
            work_dir = Path(args.run_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
        result = train(args, dims, work_dir)
        from jobs.merge import merge_checkpoint

        merge_checkpoint(result["checkpoint"], str(result["init_dir"]), out, dtype=args.save_dtype, write_info=False)

    from raylens.checkpoints.loading import load_hf_model

    from raylens.images import TilingSpec

    model, tokenizer, spec = load_hf_model(out)
    # The check reads the tiling back from the saved config, as the caption job does.
    loaded = TilingSpec(tile_size=spec.tile_size, min_tiles=spec.min_tiles, max_tiles=spec.max_tiles,
                        use_thumbnail=spec.use_thumbnail)
    if loaded != tiling_spec(dims) or spec.image_tokens_per_tile != dims.image_tokens_per_tile:
        raise AssertionError(f"saved tiling {spec} differs from the trained one {tiling_spec(dims)}")
    accuracy, errors = held_out_accuracy(model, tokenizer, loaded, spec.image_tokens_per_tile,
                                         args.eval_images, args.eval_seed)
    write_training_md(out, args, dims, result, accuracy, errors)
    summary = dict(steps=args.steps, seed=args.seed, train_minutes=round(result["train_s"] / 60, 2),
                   train_cpu_minutes=round(result["train_cpu_s"] / 60, 2),
                   final_loss=round(result["final_loss"], 4), held_out_accuracy=accuracy,
                   eval_images=args.eval_images, parameters=result["n_params"], bytes_on_disk=dir_size(out))
    print(json.dumps(summary, indent=2))
    for expected, got in errors[:10]:
        print(f"  expected {expected!r}, got {got!r}")


if __name__ == "__main__":
    main()
