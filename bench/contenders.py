"""The contenders of the throughput benchmark, each run in its own process by `bench.throughput`.

Every contender captions the same JPEG files with the same checkpoint, prompt and settings (greedy,
`ignore_eos`, `max_new_tokens`, `max_tiles`) and reports:
  startup_s      process start -> engine ready (model load, warm-up)
  steady_s       time of the measured part, images counted from files on disk (decode included)
  images_per_s   images / steady_s;  output_tokens_per_s likewise
Contenders:
  pipeline       what a user writes with lmdeploy: `pipe([...all prompts...])` on PIL images
  transformers   what a user writes with transformers: batched `generate` over our own tiles
  raylens        the batch job's Ray Data pipeline (CPU tasks + lmdeploy engine actors); steady state is
                 measured between the first and the last output batch, so pipeline fill is excluded
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
    from raylens.prompts import get_template

    t0 = time.perf_counter()
    spec = read_model_spec(args["model"])
    pipe = pipeline(
        args["model"],
        backend_config=PytorchEngineConfig(**args.get("engine_options", {})),
        chat_template_config=lmdeploy_chat_template(get_template(spec.template), "bench"),
        trust_remote_code=True,
    )
    gen = GenerationConfig(max_new_tokens=args["max_new_tokens"], ignore_eos=True, do_sample=False)

    def messages(image):
        return [{"role": "user", "content": [
            {"type": "image_data", "image_data": {"data": image, "max_dynamic_patch": args["max_tiles"]}},
            {"type": "text", "text": PROMPT},
        ]}]

    paths = _paths(args)
    warm = [messages(Image.open(p).convert("RGB")) for p in paths[:8]]
    pipe(warm, gen_config=gen)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    prompts = [messages(Image.open(p).convert("RGB")) for p in paths]
    outs = pipe(prompts, gen_config=gen)
    steady = time.perf_counter() - t1
    pipe.close()
    tokens = sum(o.generate_token_len for o in outs)
    return dict(startup_s=startup, steady_s=steady, images=len(paths), output_tokens=tokens,
                input_tokens_per_image=outs[0].input_token_len, t_start=t1 - t0, t_end=t1 - t0 + steady)


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
    t1 = time.perf_counter()
    tokens, input_tokens = 0, 0
    for i in range(0, len(paths), batch):
        for r in asyncio.run(engine.generate(requests(paths[i : i + batch]), params)):
            tokens += r.num_output_tokens
            input_tokens = r.num_input_tokens
    steady = time.perf_counter() - t1
    return dict(startup_s=startup, steady_s=steady, images=len(paths), output_tokens=tokens,
                input_tokens_per_image=input_tokens, t_start=t1 - t0, t_end=t1 - t0 + steady)


def run_raylens(args: dict) -> dict:
    import tempfile

    import ray

    from jobs.caption import build_dataset, pending_rows, setup
    from jobs.caption_config import CaptionJobConfig

    t0 = time.perf_counter()
    ray.init(logging_level="ERROR")
    out = tempfile.mkdtemp(prefix="raylens-bench-")
    cfg = CaptionJobConfig(
        input=args["images"], output=out, overwrite=True, model=args["model"], engine=args.get("engine", "lmdeploy"),
        max_tiles=args["max_tiles"], max_new_tokens=args["max_new_tokens"], ignore_eos=True,
        batch_size=args.get("batch_size", 32), replicas=args.get("replicas", 1),
        gpus_per_replica=args.get("gpus_per_replica", 1.0),
        engine_args=json.dumps(args.get("engine_options", {})) if args.get("engine_options") else None,
    )
    plan = setup(cfg)
    plan.items = plan.items[: args["n_images"]]
    rows, _ = pending_rows(plan)
    ds, _ = build_dataset(plan, rows)
    marks: list[tuple[float, int, int]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        marks.append((time.perf_counter() - t0, batch.num_rows, sum(batch.column("num_output_tokens").to_pylist())))
    ray.shutdown()
    first_t, first_rows, first_tokens = marks[0]
    rows = sum(m[1] for m in marks)
    tokens = sum(m[2] for m in marks)
    steady = marks[-1][0] - first_t
    return dict(startup_s=first_t, steady_s=steady, images=rows - first_rows, output_tokens=tokens - first_tokens,
                total_images=rows, total_wall_s=marks[-1][0], t_start=first_t, t_end=marks[-1][0])


def run_raylens_lmdeploy_preprocess(args: dict) -> dict:
    """The job, but images go through lmdeploy's own single-threaded preprocessing (for comparison)."""
    return run_raylens({**args, "engine_options": {**args.get("engine_options", {}), "preprocess": "lmdeploy"}})


CONTENDERS = {
    "pipeline": run_pipeline,
    "transformers": run_transformers,
    "raylens": run_raylens,
    "raylens-lmdeploy-prep": run_raylens_lmdeploy_preprocess,
}


if __name__ == "__main__":
    name, args_json, out_json = sys.argv[1:4]
    os.environ.setdefault("LMDEPLOY_ENABLE_CHECK_ENV", "0")
    result = CONTENDERS[name](json.loads(args_json))
    Path(out_json).write_text(json.dumps(result))
