"""LoRA fine-tuning speed and memory: `jobs.finetune --workers 1` (Ray Train) against a plain single-process
transformers + peft loop, on the same data with the same settings, in the same run; plus an FSDP smoke run
(`jobs.finetune --strategy fsdp --workers 1`: a real one-rank FSDP2 sharding).

    python -m bench.finetune_compare --size 2b --tiles 6 --steps 40 --warmup-steps 10 --out r.json   # one GPU
    python -m bench.finetune_compare --tiny --out r.json                                              # CPU, ~1 min

The model is a random-weight checkpoint of a real InternVL2 size (`raylens.checkpoints.tiny`); the data is
`--images` synthetic photos whose size gives exactly `--tiles` tiles (plus the thumbnail), each with a
question and a ~40-token answer (LLaVA JSONL). Both contenders: LoRA r 16 / alpha 32 / dropout 0.05 on every
LLM linear layer, `--dtype` weights with float32 LoRA under autocast, gradient checkpointing, AdamW, the same
batch size, the same data loading (`raylens.training.samples` in `--loader-workers` DataLoader processes).
Each contender runs in a process of its own (clean GPU-memory peaks). samples/s is measured over the steps
after `--warmup-steps` (startup, compilation and allocator warm-up excluded); peak memory is torch's
max_memory_allocated/reserved of the training process. Prints a Markdown table and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONTENDERS = ("raylens", "plain", "fsdp")
ANSWER_WORDS = ("the image shows a small red square next to a large blue circle on a white table near "
                "the window with two green trees in the background and a yellow sun in the sky").split()


@dataclass
class Settings:
    """One comparison's settings, shared by every contender (passed to subprocesses as JSON)."""

    model: str
    data: str
    workdir: str
    tiles: int
    steps: int
    warmup_steps: int
    batch_size: int
    lora_r: int = 16
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    loader_workers: int = 2
    lr: float = 4e-5
    gpu: bool = True
    threads: int | None = None  # torch's CPU threads in every contender (None: each its own default; Ray gives a
    #                             worker OMP_NUM_THREADS = its CPUs, a plain process gets every core)
    extra: dict = field(default_factory=dict)


def grid_for(tiles: int) -> tuple[int, int]:
    """(cols, rows) with cols * rows == tiles, as square as possible, wider than tall."""
    rows = max(r for r in range(1, int(math.isqrt(tiles)) + 1) if tiles % r == 0)
    return tiles // rows, rows


def write_data(folder: Path, n: int, tiles: int, tile_size: int) -> Path:
    """`n` JPEGs of exactly `tiles` tiles and a LLaVA JSONL asking about each."""
    from bench.data import write_images

    cols, rows = grid_for(tiles)
    images = write_images(folder / "images", n, size=(cols * tile_size, rows * tile_size))
    lines = []
    for i, path in enumerate(images):
        answer = " ".join(ANSWER_WORDS[(i + j) % len(ANSWER_WORDS)] for j in range(30))
        lines.append(json.dumps({"id": str(i), "image": f"images/{path.name}", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": answer}]}))
    data = folder / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def _steady(per_step: list[tuple[float, int, int]], warmup: int) -> tuple[float, float, int]:
    """(samples/s, tokens/s, steps measured) from cumulative (elapsed_s, samples, tokens) after `warmup` steps."""
    start, end = per_step[warmup - 1] if warmup else (0.0, 0, 0), per_step[-1]
    seconds = end[0] - start[0]
    return (end[1] - start[1]) / seconds, (end[2] - start[2]) / seconds, len(per_step) - warmup


def run_finetune(settings: Settings, strategy: str) -> dict:
    """jobs.finetune with one worker, read back from the run's metrics.jsonl."""
    from jobs.finetune import main, setup
    from jobs.finetune_config import FinetuneConfig
    from raylens.training.checkpoint import HISTORY_FILE, latest_checkpoint
    from raylens.training.loop import read_history

    started = time.perf_counter()
    config = FinetuneConfig(
        data=settings.data, output=str(Path(settings.workdir) / f"run-{strategy}"), model=settings.model,
        workers=1, gpus_per_worker=1.0 if settings.gpu else 0.0, strategy=strategy, max_steps=settings.steps,
        batch_size=settings.batch_size, lora_r=settings.lora_r, max_tiles=settings.tiles, dtype=settings.dtype,
        gradient_checkpointing=settings.gradient_checkpointing, loader_workers=settings.loader_workers,
        lr=settings.lr, save_every=settings.steps, keep=1, log_every=10, overwrite=True, threads=settings.threads,
        cpus_per_worker=1 + settings.loader_workers if settings.gpu else 1,
    )
    plan = setup(config)
    summary = main(plan)
    if summary["error"]:
        return {"error": summary["error"], "wall_s": time.perf_counter() - started}
    history = read_history(str(Path(latest_checkpoint(plan.out_fs, plan.out_root)) / HISTORY_FILE))
    per_step = [(m["elapsed_s"], m["samples"], m["tokens"]) for m in history]
    samples_per_s, tokens_per_s, measured = _steady(per_step, settings.warmup_steps)
    last = history[-1]
    return {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "measured_steps": measured,
            "peak_allocated_gb": last.get("gpu_peak_allocated_gb"), "peak_reserved_gb": last.get("gpu_peak_reserved_gb"),
            "final_loss": last["loss"], "wall_s": time.perf_counter() - started}


def run_plain(settings: Settings) -> dict:
    """What a user would write: load, peft, a DataLoader, AdamW, autocast, backward, clip, step."""
    import torch
    from peft import get_peft_model

    from raylens.checkpoints.loading import load_hf_model
    from raylens.training.lora import TrainableSpec, lora_config
    from jobs.finetune_config import FinetuneConfig
    from raylens.training.optim import lr_at
    from raylens.training.records import read_training_data
    from raylens.training.samples import SampleEncoder, collate

    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device("cuda" if settings.gpu else "cpu")
    dtype = getattr(torch, settings.dtype)
    torch.manual_seed(0)
    model, tokenizer, spec = load_hf_model(settings.model, dtype=dtype, device=device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = model.config.text_config.use_cache = False
    model = get_peft_model(model, lora_config(model, TrainableSpec(lora_r=settings.lora_r, lora_alpha=2 * settings.lora_r)))
    model.train()
    records = read_training_data(settings.data).records
    encoder = SampleEncoder(spec=spec, tokenizer=tokenizer, max_length=8192, max_tiles=settings.tiles)

    class Records(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            return encoder.encode(records[i])

    loader = torch.utils.data.DataLoader(
        Records(), batch_size=settings.batch_size, shuffle=True, drop_last=True, num_workers=settings.loader_workers,
        collate_fn=lambda samples: collate(samples, tokenizer.pad_token_id),
        prefetch_factor=2 if settings.loader_workers else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    # jobs.finetune's default schedule (linear warm-up, then cosine to 0), so the losses compare too
    warmup_ratio = next(f.default for f in fields(FinetuneConfig) if f.name == "warmup_ratio")
    warmup = math.ceil(warmup_ratio * settings.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, settings.steps, settings.lr, warmup) / settings.lr)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step, samples, tokens = [], 0, 0
    clock = time.perf_counter()

    def batches():
        while True:
            yield from loader

    for step, batch in zip(range(settings.steps), batches()):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss.item()  # the host waits for the step, as a training loop that logs does
        samples += batch["num_samples"]
        tokens += batch["num_tokens"]
        per_step.append((time.perf_counter() - clock, samples, tokens))
    samples_per_s, tokens_per_s, measured = _steady(per_step, settings.warmup_steps)
    out = {"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "measured_steps": measured,
           "final_loss": last_loss, "wall_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def run_contender(name: str, settings: Settings) -> dict:
    try:
        if name == "plain":
            return run_plain(settings)
        return run_finetune(settings, "fsdp" if name == "fsdp" else "ddp")
    except Exception as exc:  # noqa: BLE001 - one contender's failure is a row of the table, not the end
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_in_subprocess(name: str, settings: Settings, timeout_s: float) -> dict:
    """Run one contender in a process of its own; its whole output goes to WORKDIR/NAME.log, whose tail an error
    row carries (a timed-out contender's log says how far it got)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(asdict(settings), f)
    command = [sys.executable, "-m", "bench.finetune_compare", "run", name, f.name]
    log = Path(settings.workdir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        try:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s; the end of {log}: {_tail(log)}"}
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {_tail(log)}"}
    return json.loads(lines[-1][len("RESULT "):])


def _tail(log: Path, chars: int = 1500) -> str:
    return log.read_text(errors="replace")[-chars:]


def table(results: dict) -> str:
    rows = ["| contender | samples/s | tokens/s | vs plain | peak allocated GiB | peak reserved GiB | loss | error |",
            "|---|---|---|---|---|---|---|---|"]
    plain = results.get("plain", {}).get("samples_per_s")
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | | | | | | | {r['error'].splitlines()[0][:120]} |")
            continue
        ratio = f"{r['samples_per_s'] / plain:.3f}x" if plain else ""
        gb = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
        rows.append(f"| {name} | {r['samples_per_s']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | "
                    f"{gb('peak_allocated_gb')} | {gb('peak_reserved_gb')} | {r['final_loss']:.4f} | |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2b", help="random checkpoint size: tiny, 1b, 2b (default: %(default)s)")
    p.add_argument("--model", default=None, help="an existing checkpoint directory instead of --size")
    p.add_argument("--tiles", type=int, default=6, help="tiles per image (+ thumbnail) (default: %(default)s)")
    p.add_argument("--images", type=int, default=64, help="training records (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per contender (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per step (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads in every contender (default: each its own: the Ray worker's CPUs, all cores)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--workdir", default="/tmp/raylens-finetune-compare")
    p.add_argument("--timeout", type=float, default=300, help="seconds per contender (default: %(default)s)")
    p.add_argument("--in-process", action="store_true", help="run the contenders in this process (CPU tests)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke preset: tiny model, 2 tiles, 8 images, 4 steps (2 measured), float32, in-process")
    p.add_argument("--out", required=True, help="JSON results file")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # a contender's own process: run NAME SETTINGS_JSON
        result = run_contender(argv[1], Settings(**json.loads(Path(argv[2]).read_text())))
        print("RESULT " + json.dumps(result), flush=True)
        return result
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.size, args.tiles, args.images, args.steps, args.warmup_steps = "tiny", 2, 8, 4, 2
        args.dtype, args.loader_workers, args.in_process = "float32", 0, True
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        from bench.throughput import ensure_checkpoint

        model = ensure_checkpoint(workdir, args.size)
    from raylens.checkpoints.formats import ModelSpec

    spec = ModelSpec.from_dir(model)
    data = write_data(workdir / f"data-t{args.tiles}", args.images, args.tiles, spec.tile_size)
    import torch

    settings = Settings(model=str(model), data=str(data), workdir=str(workdir), tiles=args.tiles, steps=args.steps,
                        warmup_steps=args.warmup_steps, batch_size=args.batch_size, lora_r=args.lora_r,
                        dtype=args.dtype, gradient_checkpointing=not args.no_gradient_checkpointing,
                        loader_workers=args.loader_workers, gpu=torch.cuda.is_available(), threads=args.threads)
    results = {}
    for name in args.contenders:
        print(f"--- {name}", flush=True)
        results[name] = (run_contender(name, settings) if args.in_process
                         else run_in_subprocess(name, settings, args.timeout))
        print(json.dumps(results[name]), flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"settings": asdict(settings), "device": device, "results": results}
    if "samples_per_s" in results.get("raylens", {}) and "samples_per_s" in results.get("plain", {}):
        report["raylens_vs_plain_speed"] = results["raylens"]["samples_per_s"] / results["plain"]["samples_per_s"]
        if results["plain"].get("peak_allocated_gb"):
            report["raylens_vs_plain_memory"] = results["raylens"]["peak_allocated_gb"] / results["plain"]["peak_allocated_gb"]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{device}, {spec.llm_architecture} ({args.size if not args.model else model}), {args.tiles} tiles, "
          f"batch {args.batch_size}, LoRA r {args.lora_r}, {args.dtype}, gradient checkpointing "
          f"{'on' if settings.gradient_checkpointing else 'off'}, {args.steps - args.warmup_steps} measured steps\n")
    print(table(results), flush=True)
    return report


if __name__ == "__main__":
    main()
