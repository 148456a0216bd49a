"""The contenders of the throughput benchmark, each run in its own process by `bench.throughput`.

Every contender captions the same JPEG files with the same checkpoint, prompt and settings (greedy,
`ignore_eos`, `max_new_tokens`, `max_tiles`) and reports:
  startup_s      process start -> engine ready (model load, warm-up)
  steady_s       time of the measured part, images counted from files on disk (decode included)
  t_start/t_end  the measured part in wall-clock time (`time.time()`), to match GPU-utilisation samples
Contenders:
  pipeline       what a user writes with lmdeploy: `pipe([...all prompts...])` on PIL images
  pipeline-1thread, pipeline-4threads   the same with `torch.set_num_threads(1)` or `(4)`: lmdeploy's image
                 preprocessing without the straggler effect of the 1B puzzle (docs/benchmarks.md); 4 threads
                 is what a user who knows about it would set, the fairer baseline
  transformers   what a user writes with transformers: batched `generate` over our own tiles
  raylens        the batch job's Ray Data pipeline (CPU tasks + lmdeploy engine actors); steady state runs
                 from the moment the first engine is built (warm-up done) to the last output, so it
                 includes the pipeline's fill and drain
  raylens-lmdeploy-prep   the same job with lmdeploy's own image preprocessing (`preprocess="lmdeploy"`)

Run one directly: `python -m bench.contenders pipeline ARGS_JSON OUT_JSON`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PROMPT = "Provide a one-sentence caption for the provided image."


def _paths(args: dict) -> list[Path]:
    return sorted(Path(args["images"]).glob("*.jpg"))[: args["n_images"]]


def run_pipeline(args: dict) -> dict:
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
    from PIL import Image

    from raylens.checkpoints.formats import read_model_spec
    from raylens.engines.lmdeploy_engine import lmdeploy_chat_template

    t0 = time.perf_counter()
    probe = _PreprocessProbe() if args.get("timeline") else None
    spec = read_model_spec(args["model"])
    pipe = pipeline(
        args["model"],
        backend_config=PytorchEngineConfig(**args.get("engine_options", {})),
        chat_template_config=lmdeploy_chat_template(spec.chat_template(), "bench", spec.system_message),
        trust_remote_code=True,
    )
    gen = GenerationConfig(max_new_tokens=args["max_new_tokens"], ignore_eos=True, do_sample=False)
    if args.get("torch_threads"):  # what fewer torch threads do to lmdeploy's preprocessing (issue 16)
        import torch

        torch.set_num_threads(args["torch_threads"])

    def messages(image):
        return [{"role": "user", "content": [
            {"type": "image_data", "image_data": {"data": image, "max_dynamic_patch": args["max_tiles"]}},
            {"type": "text", "text": PROMPT},
        ]}]

    paths = _paths(args)
    warm = [messages(Image.open(p).convert("RGB")) for p in paths[:8]]
    pipe(warm, gen_config=gen)
    startup = time.perf_counter() - t0
    t1, wall_start = time.perf_counter(), time.time()
    prompts = [messages(Image.open(p).convert("RGB")) for p in paths]
    if args.get("self_profile"):
        from bench.self_profile import profile_later

        sp = args["self_profile"]
        profile_later(sp["dir"], f"pipeline-{args['size']}", sp["after_s"], sp["duration_s"])
    if args.get("workload") == "mixed":  # each image's own answer length, as the raylens contender gets
        from bench.data import output_length

        gens = [GenerationConfig(max_new_tokens=output_length(p.name), ignore_eos=True, do_sample=False) for p in paths]
        outs = pipe(prompts, gen_config=gens)
    else:
        outs = pipe(prompts, gen_config=gen)
    steady = time.perf_counter() - t1
    t_end = time.time()
    extra = {}
    if probe is not None:  # lmdeploy's own image preprocessing: during the run, then alone on an idle engine
        extra["preprocess_during_run_ms"] = probe.summary(wall_start, t_end)
        try:
            encoder = pipe.async_engine.vl_encoder.model
            for p in paths[:64]:
                image = Image.open(p).convert("RGB")
                encoder.preprocess([{"role": "user", "content": [
                    {"type": "image", "data": image, "max_dynamic_patch": args["max_tiles"]}]}])
            extra["preprocess_alone_ms"] = probe.summary(t_end, time.time())
        except Exception as exc:  # noqa: BLE001 - an lmdeploy internal; the figure is then missing, not the run
            extra["preprocess_alone_ms"] = {"error": f"{type(exc).__name__}: {exc}"}
    pipe.close()
    tokens = sum(o.generate_token_len for o in outs)
    return dict(startup_s=startup, steady_s=steady, images=len(paths), output_tokens=tokens,
                input_tokens_per_image=outs[0].input_token_len, t_start=wall_start, t_end=t_end, **extra)


class _PreprocessProbe:
    """Times every call of lmdeploy's InternVL image preprocessing (tiling + torchvision transforms), to
    compare its per-image cost while the engine runs with its cost alone (the 1B/2B puzzle, issue 16)."""

    def __init__(self) -> None:
        from lmdeploy.vl.model.internvl import InternVLVisionModel

        self.calls: list[tuple[float, float]] = []
        original = InternVLVisionModel.preprocess

        def timed(model, *a, **kw):
            start = time.time()
            try:
                return original(model, *a, **kw)
            finally:
                self.calls.append((start, time.time() - start))

        InternVLVisionModel.preprocess = timed

    def summary(self, start: float, end: float) -> dict:
        ms = sorted(1000 * d for t, d in self.calls if start <= t <= end)
        if not ms:
            return {"calls": 0}
        return {"calls": len(ms), "mean": round(sum(ms) / len(ms), 2), "p50": round(ms[len(ms) // 2], 2),
                "p90": round(ms[int(len(ms) * 0.9)], 2)}


def run_transformers(args: dict) -> dict:
    import asyncio

    from raylens.engines.base import SamplingParams, VLRequest
    from raylens.engines.transformers_engine import TransformersEngine
    from raylens.images import decode_image, prepare_image

    t0 = time.perf_counter()
    batch = args.get("batch_size", 32)
    engine = TransformersEngine(args["model"], max_batch_size=batch)
    tiling = engine.tiling(args["max_tiles"])
    params = SamplingParams(max_new_tokens=args["max_new_tokens"], ignore_eos=True)
    paths = _paths(args)

    def requests(chunk):
        return [VLRequest(str(p), PROMPT, prepare_image(decode_image(p.read_bytes()), tiling)) for p in chunk]

    asyncio.run(engine.generate(requests(paths[:4]), params))
    startup = time.perf_counter() - t0
    t1, wall_start = time.perf_counter(), time.time()
    tokens, input_tokens = 0, 0
    for i in range(0, len(paths), batch):
        for r in asyncio.run(engine.generate(requests(paths[i : i + batch]), params)):
            tokens += r.num_output_tokens
            input_tokens = r.num_input_tokens
    steady = time.perf_counter() - t1
    return dict(startup_s=startup, steady_s=steady, images=len(paths), output_tokens=tokens,
                input_tokens_per_image=input_tokens, t_start=wall_start, t_end=time.time())


def run_raylens(args: dict) -> dict:
    """The job's own pipeline. Steady state runs from the first engine's end of construction (recorded by
    `bench.timed_engine`) to the last output; "first_to_last" (first output batch to the last) is kept for
    comparison with the first session's figures, which overstate."""
    import tempfile

    import ray

    from bench.timed_engine import read_ready_times, read_timelines
    from jobs.caption import build_dataset, pending_rows, setup
    from jobs.caption_config import CaptionJobConfig

    t0 = time.time()
    ray.init(logging_level="ERROR")
    phases = {"ray_init": round(time.time() - t0, 2)}
    out = tempfile.mkdtemp(prefix="raylens-bench-")
    ready_dir = tempfile.mkdtemp(prefix="raylens-ready-")
    engine_options = {**args.get("engine_options", {}), "ready_dir": ready_dir, "inner": args.get("engine", "lmdeploy"),
                      "timeline": bool(args.get("timeline")), "profile": args.get("self_profile"),
                      "vary_output": args.get("workload") == "mixed"}
    cfg = CaptionJobConfig(
        input=args["images"], output=out, overwrite=True, model=args["model"],
        engine="bench.timed_engine:TimedEngine",
        max_tiles=args["max_tiles"], max_new_tokens=args["max_new_tokens"], ignore_eos=True,
        batch_size=args.get("batch_size", 32), replicas=str(args.get("replicas", 1)),
        batches_in_flight=args.get("batches_in_flight", 8),
        gpus_per_replica=args.get("gpus_per_replica", 1.0), engine_args=json.dumps(engine_options),
        tiles_on_cpu=bool(args.get("tiles_on_cpu", CaptionJobConfig.tiles_on_cpu)),
    )
    plan = setup(cfg)
    plan.items = plan.items[: args["n_images"]]
    rows, _ = pending_rows(plan)
    ds, _ = build_dataset(plan, rows)
    phases["setup_and_plan"] = round(time.time() - t0, 2)
    marks: list[tuple[float, int, int]] = []
    errors = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        marks.append((time.time() - t0, batch.num_rows, sum(batch.column("num_output_tokens").to_pylist())))
        errors += batch.num_rows - batch.column("error").null_count
    ray.shutdown()
    engines = [{k: round(v - t0, 2) for k, v in e.items()} for e in read_ready_times(ready_dir)]
    if not engines:
        raise RuntimeError("no engine recorded its ready time")
    images = sum(m[1] for m in marks)
    tokens = sum(m[2] for m in marks)
    first_ready, last_output = engines[0]["ready"], marks[-1][0]
    first_t, first_rows = marks[0][0], marks[0][1]
    if errors:
        raise RuntimeError(f"{errors} of {images} rows failed; a benchmark counts only captioned images")
    timelines = [{"samples": [(round(t - t0, 2), *rest) for t, *rest in tl["samples"]],
                  "batches": [(round(a - t0, 2), round(b - t0, 2), n) for a, b, n in tl["batches"]]}
                 for tl in read_timelines(ready_dir)]
    return dict(startup_s=first_ready, steady_s=last_output - first_ready, images=images, output_tokens=tokens,
                engines=engines, phases=phases, timelines=timelines, t0=t0, first_output_s=first_t, first_to_last_images_per_s=(round((images - first_rows) / (last_output - first_t), 2)
                                            if last_output > first_t else None),  # one output batch: no span
                t_start=t0 + first_ready, t_end=t0 + last_output)


def run_raylens_lmdeploy_preprocess(args: dict) -> dict:
    """The job, but images go through lmdeploy's own single-threaded preprocessing (for comparison)."""
    return run_raylens({**args, "engine_options": {**args.get("engine_options", {}), "preprocess": "lmdeploy"}})


def pipeline_with_torch_threads(threads: int):
    """The pipeline with torch's CPU ops on `threads` threads: without the straggler effect on lmdeploy's
    image preprocessing (docs/benchmarks.md, "The 1B puzzle")."""
    def run(args: dict) -> dict:
        return run_pipeline({**args, "torch_threads": threads})
    return run


CONTENDERS = {
    "pipeline": run_pipeline,
    "pipeline-1thread": pipeline_with_torch_threads(1),
    "pipeline-4threads": pipeline_with_torch_threads(4),
    "transformers": run_transformers,
    "raylens": run_raylens,
    "raylens-lmdeploy-prep": run_raylens_lmdeploy_preprocess,
}


if __name__ == "__main__":
    name, args_json, out_json = sys.argv[1:4]
    os.environ.setdefault("LMDEPLOY_ENABLE_CHECK_ENV", "0")
    result = CONTENDERS[name](json.loads(args_json))
    Path(out_json).write_text(json.dumps(result))
