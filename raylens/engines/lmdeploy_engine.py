"""Run InternVL2 with lmdeploy's PyTorch engine (GPU only), keeping its scheduler fed asynchronously.

Only this module imports lmdeploy, and only inside `LMDeployEngine.__init__`, so everything else in
raylens imports on machines without CUDA. Facts this relies on (notes/lmdeploy.md):
* the original InternVL2 format needs `trust_remote_code=True`; without its config classes lmdeploy's
  checker calls `exit(1)`, which we turn into a RuntimeError so a Ray actor reports it instead of vanishing;
* lmdeploy 0.18 has no InternVL chat template, so we hand it ours (`ChatTemplateConfig`), built from the
  checkpoint's `raylens.prompts` template and system message, as the transformers engine uses them;
* an engine is bound to one event loop: it starts lazily on the loop of the first `generate` call, and
  every request of a batch is submitted at once, so continuous batching sees the whole batch (and, with
  several batches in flight in the Ray actor, more than one);
* lmdeploy tiles and normalises images on ONE thread per engine (`vl/engine.py`), which caps an engine
  at tens of photos per second. With `preprocess="raylens"` (the default) we hand the engine ready
  inputs instead: token ids from our template and normalised tiles built on a thread pool, attached as
  the `multimodal` entries its InternVL input processor reads (pixel_values, offset, image_tokens,
  image_token_id; one entry per image of a conversation). Tiles the batch job's CPU stage already made in the
  model's dtype (`--tiles-on-cpu`) are forwarded as they are, a view of their bytes. `preprocess="lmdeploy"` sends PIL images
  through lmdeploy's own path (a comparison mode: it cannot leave out the system turn per request);
* `stream` and `generate` read the same async output (`raylens.engines.text.AnswerText` makes the text), so
  a stream adds up to what generate returns. The final text is decoded here from the generated token ids,
  as the transformers engine decodes it: lmdeploy's own `response` text drops a tail that ends inside a
  UTF-8 character (an answer cut by max_tokens mid-character came back empty from `generate`, and a stream
  whose every step ended so lost the rest of its answer; seen on the GPU with a random-weight model).
  lmdeploy turns stop *words* into every token that contains them, so OpenAI stop strings are matched here
  on the text, and the request is aborted (closing lmdeploy's generator cancels its session) once one appears;
* lmdeploy's own `RequestError`s map onto ours: a bad request or one too long for the session is a
  `RequestError`, an unavailable engine an `EngineDeadError`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Sequence

from raylens.checkpoints.formats import ModelSpec
from raylens.engines.base import (
    EngineDeadError,
    RequestError,
    SamplingParams,
    VLDelta,
    VLRequest,
    VLResult,
    format_error,
)
from raylens.engines.encoding import CachedPromptTokenizer, encode_request, tiling_of
from raylens.engines.kv_cache import DEFAULT_CACHE_FRACTION, capped_cache_fraction
from raylens.engines.text import AnswerText
from raylens.images import TILE_DTYPES, PreparedImage, pixel_values_for, with_pixel_values
from raylens.prompts import IMAGE_PLACEHOLDER, ChatTemplate

PREPROCESS_MODES = ("raylens", "lmdeploy")
logger = logging.getLogger(__name__)


def lmdeploy_chat_template(template: ChatTemplate, name: str, system_message: str | None = None):
    """Our InternVL template as an lmdeploy `ChatTemplateConfig` (MPT style: `sep` closes every turn, no
    separator besides). `system_message` defaults to the template's; "" means no system turn."""
    from lmdeploy import ChatTemplateConfig

    system_prefix = template.system_template.split("{system_message}")[0]
    message = template.system_message if system_message is None else system_message
    return ChatTemplateConfig(
        model_name=name,
        system=system_prefix,
        meta_instruction=message or None,
        eosys=template.sep,
        user=template.user_role,
        eoh=template.sep,
        assistant=template.assistant_role,
        eoa=template.sep,
        separator="",
        stop_words=list(template.stop_words),
    )


def _measure_free_gpu_memory() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]


def free_gpu_memory(tp: int) -> int | None:
    """Free memory on the GPU the engine's rank 0 will use; None where that GPU cannot be seen.

    With tp > 1 in the caption job the actor that builds the engine holds no GPU itself: lmdeploy's
    workers run on the GPUs of the actor's placement group (jobs.caption._tp_placement), so a short task
    placed there measures."""
    import torch

    if torch.cuda.is_available():
        return _measure_free_gpu_memory()
    import ray
    from ray.util import get_current_placement_group

    if tp == 1 or not ray.is_initialized() or get_current_placement_group() is None:
        return None
    probe = ray.remote(num_gpus=0.01, num_cpus=0)(_measure_free_gpu_memory)
    return ray.get(probe.remote(), timeout=300)


def _keep_actor_connected_to_ray() -> None:
    """Stop lmdeploy's Ray executor (tp > 1) from calling `ray.shutdown()` inside our Ray actor.

    lmdeploy 0.18's `RayContext.shutdown` runs when its engine fails to start or is released, and calls
    `ray.shutdown()` whenever Ray is initialised. In an actor that cuts the actor's own worker off from
    Ray: an engine that failed to build then aborted the process ("'Worker' object has no attribute
    'core_worker'") instead of raising, and Ray Data restarted the actor again and again (seen on 2 GPUs).
    Inside an actor we keep its placement-group cleanup and skip the shutdown; elsewhere nothing changes."""
    import ray
    from lmdeploy.pytorch.ray import RayContext

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    if getattr(RayContext.shutdown, "keeps_ray_connected", False):
        return

    def shutdown(self) -> None:
        if self.owned_pg:
            ray.util.remove_placement_group(self.placement_group)

    shutdown.keeps_ray_connected = True
    RayContext.shutdown = shutdown


def set_gil_switch_interval(ms: float) -> None:
    """The engine process's GIL switch interval (`LMDeployEngine`'s `gil_switch_interval_ms` says why)."""
    if not 0 < ms <= 100:
        raise ValueError(f"gil_switch_interval_ms must be in (0, 100], got {ms}")
    sys.setswitchinterval(ms / 1000.0)


def _quiet_host_memory_housekeeping(async_engine, trim_every: int) -> None:
    """Keep Python's garbage collection off the engine's critical path.

    lmdeploy 0.18's PyTorch engine runs `gc.collect()` + `malloc_trim` on its event-loop thread after
    every 128 finished multimodal sessions (`LMDEPLOY_MULTIMODAL_SESSION_TRIM_COUNT`). A full collection
    walks every object of the process (Ray, Arrow, torch, the model), so in a Ray actor it held the GIL
    for 38% of the samples of a GIL profile at 2B / 1 tile and stalled the scheduler every ~1.3 s
    (docs/benchmarks.md, issue 16). Here the trim runs every `trim_every` sessions instead (0: never), and
    everything alive once the engine is built (model, libraries) is frozen out of future collections,
    so the collections that still happen (ours and Python's own) only walk per-request objects.
    """
    import gc

    backend = getattr(async_engine, "engine", None)  # the PyTorch Engine when it runs in this process
    if backend is not None and hasattr(backend, "_multimodal_session_trim_count"):
        backend._multimodal_session_trim_count = max(0, int(trim_every))
    elif _runs_in_child_process(backend):
        pass  # its own process read TRIM_COUNT_ENV when it started (`_engine_process_env`)
    else:
        logger.warning("lmdeploy's engine has no _multimodal_session_trim_count: its periodic gc.collect() "
                       "stays on (check after an lmdeploy upgrade)")
    gc.collect()
    gc.freeze()


TRIM_COUNT_ENV = "LMDEPLOY_MULTIMODAL_SESSION_TRIM_COUNT"


def _runs_in_child_process(backend) -> bool:
    """True for lmdeploy's multi-process engine (`enable_mp_engine`), whose scheduler and model run in a
    process of their own, reached over ZMQ."""
    return backend is not None and type(backend).__name__.endswith("MPEngine")


def _engine_process_env(memory_trim_every: int) -> dict[str, str]:
    """Environment the engine's own process must start with. With `enable_mp_engine` lmdeploy spawns the
    engine in a child that reads `TRIM_COUNT_ENV` at import and inherits this process's environment, so the
    trim setting travels that way (in this process the engine's attribute is set instead)."""
    return {TRIM_COUNT_ENV: str(max(0, int(memory_trim_every)))}


class LMDeployEngine:
    """One lmdeploy `VLAsyncEngine` (PyTorch backend) per instance."""

    def __init__(
        self,
        model_dir: str,
        *,
        tp: int = 1,
        max_batch_size: int | None = None,
        cache_max_entry_count: float = DEFAULT_CACHE_FRACTION,
        max_prefill_token_num: int = 8192,
        session_len: int | None = None,
        eager_mode: bool = False,
        model_name: str | None = None,
        preprocess: str = "raylens",
        preprocess_threads: int = 4,
        memory_trim_every: int = 8192,
        gil_switch_interval_ms: float | None = None,
        log_level: str = "WARNING",
        **config_options: Any,
    ) -> None:
        """Keyword arguments not named here (from `--engine-args`) go to lmdeploy's `PytorchEngineConfig`
        as they are, e.g. `num_gpu_blocks` or `block_size`; an unknown one fails with lmdeploy's own error.

        `memory_trim_every`: finished multimodal sessions between lmdeploy's gc.collect()+malloc_trim (its
        default is 128, which stalled the engine; 0 never trims; see `_quiet_host_memory_housekeeping`).

        `gil_switch_interval_ms`: this process's `sys.setswitchinterval` (None leaves Python's 5 ms). The
        engine's loop thread holds the GIL most of the time while it decodes; a preprocessing thread that
        gives the GIL up (numpy, PIL, the tokenizer release it) waits up to a whole interval to get it
        back, several times per request, so requests reach lmdeploy late (see `bench/results/s7`).

        `enable_mp_engine=True` (lmdeploy's own option, as `api_server` sets it) runs lmdeploy's scheduler and
        model in a child process reached over ZMQ, so its loop no longer competes for this process's GIL with
        the threads that prepare requests; the trim setting reaches the child through its environment.

        `log_level`: lmdeploy's own logger. Its `pipeline()` sets WARNING; an engine built directly, as here,
        is left at INFO, which logs two or three lines per request from the engine's loop (5,569 lines for
        2,048 images in the batch job, each one shipped to the driver when Ray forwards worker output).

        `cache_max_entry_count` is an upper bound: it is lowered to what `max_batch_size` full-length
        sessions can fill (raylens.engines.kv_cache), unless `num_gpu_blocks` fixes the cache size."""
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if gil_switch_interval_ms is not None:
            set_gil_switch_interval(gil_switch_interval_ms)
        from lmdeploy import PytorchEngineConfig
        from lmdeploy.serve.core import VLAsyncEngine

        # What lmdeploy's pipeline() does; after the import, which sets the logger to INFO the first time.
        logging.getLogger("lmdeploy").setLevel(log_level.upper())

        self.spec = ModelSpec.from_dir(model_dir)
        self.model_name = model_name or str(model_dir)
        self.template = self.spec.chat_template()
        if tp > 1:
            _keep_actor_connected_to_ray()
        if config_options.get("enable_mp_engine"):
            os.environ.update(_engine_process_env(memory_trim_every))
        if not config_options.get("num_gpu_blocks"):
            cache_max_entry_count = self._usable_cache_fraction(cache_max_entry_count, max_batch_size, session_len, tp)
        config = PytorchEngineConfig(
            tp=tp,
            max_batch_size=max_batch_size,
            cache_max_entry_count=cache_max_entry_count,
            max_prefill_token_num=max_prefill_token_num,
            session_len=session_len,
            eager_mode=eager_mode,
            **config_options,
        )
        try:
            self._engine = VLAsyncEngine(
                str(model_dir),
                backend="pytorch",
                backend_config=config,
                chat_template_config=lmdeploy_chat_template(self.template, f"raylens-{self.template.name}",
                                                            self.spec.system_message),
                trust_remote_code=True,
            )
        except SystemExit as exc:  # lmdeploy's environment checker exits instead of raising
            raise RuntimeError(
                f"lmdeploy refused to start on {model_dir} (exit {exc.code}); its log above says why "
                "(an original-format checkpoint needs its configuration_*.py files)"
            ) from None
        _quiet_host_memory_housekeeping(self._engine, memory_trim_every)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.preprocess = preprocess
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        if preprocess == "raylens":
            import torch

            self._image_token_id = self._tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            self._prompt_tokenizer = CachedPromptTokenizer(self._tokenizer)
            self._feature_dtype = getattr(torch, self.spec.torch_dtype, torch.bfloat16)
            self._feature_dtype_name = str(self._feature_dtype).removeprefix("torch.")
            self._pool = ThreadPoolExecutor(max_workers=preprocess_threads, thread_name_prefix="raylens-prep")

    def _usable_cache_fraction(self, fraction: float, max_batch_size: int | None, session_len: int | None,
                               tp: int) -> float:
        """`fraction` capped by the cache this engine can fill, measured on the GPU rank 0 will run on."""
        from lmdeploy.utils import get_max_batch_size

        free_bytes = free_gpu_memory(tp)
        if free_bytes is None:
            return fraction
        kv_bytes = self.spec.kv_bytes_per_token
        capped = capped_cache_fraction(
            kv_bytes // tp if kv_bytes else None,  # each rank caches its share of the KV heads
            max_batch_size=max_batch_size or get_max_batch_size("cuda"),
            session_len=session_len or self.spec.max_position_embeddings,
            free_bytes=free_bytes,
            fraction=fraction,
        )
        logger.info("KV cache: %.3f of the %.1f GiB free on the GPU (asked: %.3f)", capped, free_bytes / 2**30, fraction)
        return capped

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _ensure_started(self) -> None:
        if self._engine is None:
            raise EngineDeadError("the lmdeploy engine is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._engine.start_loop(loop, use_async_api=True)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an lmdeploy engine is bound to the event loop it started on")

    def _gen_config(self, params: SamplingParams):
        from lmdeploy import GenerationConfig

        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_p=params.top_p,
            top_k=0 if not params.greedy else 1,
            random_seed=params.seed,
            ignore_eos=params.ignore_eos,
        )

    def _messages(self, req: VLRequest) -> list[dict]:
        """OpenAI-style messages for lmdeploy's own preprocessing. Each user text keeps our placeholders as
        lmdeploy's `<IMAGE_TOKEN>`, so images land where raylens puts them."""
        from PIL import Image

        conversation, images = req.as_conversation()
        pending = list(images)
        messages: list[dict] = []
        if conversation.system is not None:
            messages.append({"role": "system", "content": conversation.system})
        for turn in conversation.turns:
            content: list[dict] = []
            for image in pending[: turn.num_images]:
                # The grid was chosen upstream from the original size; the canvas we send, tiled with the
                # max_tiles the image was prepared with, reproduces it. (lmdeploy makes the thumbnail from
                # that canvas, not from the original: this mode is for comparisons.)
                max_tiles = image.tiling.max_tiles if image.tiling else (req.max_tiles or self.spec.max_tiles)
                content.append({"type": "image_data", "image_data": {"data": Image.fromarray(image.pixels),
                                                                     "max_dynamic_patch": max_tiles}})
            del pending[: turn.num_images]
            content.append({"type": "text", "text": turn.user_text().replace(IMAGE_PLACEHOLDER, "<IMAGE_TOKEN>")})
            messages.append({"role": "user", "content": content})
            if turn.assistant is not None:
                messages.append({"role": "assistant", "content": turn.assistant})
        return messages

    def _ready_inputs(self, req: VLRequest, params: SamplingParams) -> tuple[list[int], list[dict] | None]:
        """Token ids and the `multimodal` entries (one per image) lmdeploy's InternVL input processor reads."""
        enc = encode_request(req, spec=self.spec, tokenizer=self._prompt_tokenizer, template=self.template,
                             with_pixels=False)
        self._check_length(len(enc.input_ids), params)
        if not enc.images:
            return enc.input_ids, None
        _, images = req.as_conversation()
        return enc.input_ids, [
            dict(pixel_values=self._tiles(image), offset=encoded.offset, image_tokens=encoded.num_tokens,
                 image_token_id=self._image_token_id)
            for image, encoded in zip(images, enc.images)
        ]

    def _tiles(self, image: PreparedImage):
        """`image`'s normalised tiles as a tensor of the vision tower's dtype: the CPU stage's own when it made
        them in that dtype (--tiles-on-cpu: a view of their bytes, no work here), else made here, straight into
        that dtype (one table lookup per value instead of float32 values and then a conversion)."""
        import torch

        name = self._feature_dtype_name
        if image.pixel_dtype != name:
            if name not in TILE_DTYPES:
                return torch.from_numpy(pixel_values_for(image, tiling_of(image, self.spec))).to(self._feature_dtype)
            image = with_pixel_values(image, name, tiling_of(image, self.spec))
        tiles = torch.from_numpy(image.pixel_values)
        return tiles.view(torch.bfloat16) if name == "bfloat16" else tiles

    def _check_length(self, n: int, params: SamplingParams) -> None:
        limit = getattr(self._engine, "session_len", None)
        if limit and n + params.max_new_tokens > limit:
            if n >= limit:
                raise RequestError(f"the prompt is {n} tokens, more than the engine's context of {limit} "
                                   "(fewer or smaller images, fewer tiles or a shorter conversation)", param="messages")
            raise RequestError(f"the prompt is {n} tokens and max_new_tokens is {params.max_new_tokens}: "
                               f"{n + params.max_new_tokens} exceeds the engine's context of {limit} tokens "
                               f"(at most {limit - n} new tokens fit)", param="max_tokens")

    async def _prepare(self, req: VLRequest, params: SamplingParams, gen_config):
        """lmdeploy's single-use request for `req`; RequestError for a problem of this request."""
        engine = self._engine
        try:
            if self.preprocess == "lmdeploy":
                prepared = await engine.preprocess(messages=self._messages(req), session_id=engine.session_mgr.get(),
                                                   gen_config=gen_config)
                try:
                    self._check_length(prepared.input_token_len, params)
                except RequestError:
                    engine.session_mgr.remove(prepared.session)  # never handed to generate()
                    raise
                return prepared
            input_ids, multimodal = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._ready_inputs, req, params)
            prepared = await engine.preprocess(messages=None, input_ids=input_ids, session_id=engine.session_mgr.get(),
                                               gen_config=gen_config)
        except Exception as exc:
            mapped = _our_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        if multimodal is not None:
            prepared.inputs["multimodal"] = multimodal
        return prepared

    async def _deltas(self, req: VLRequest, prepared, params: SamplingParams, stream: bool) -> AsyncIterator[VLDelta]:
        """Deltas of one prepared request; the last carries finish_reason. With stop strings the output is
        read token by token even for `generate`, so generation can be cut where one appears."""
        answer = AnswerText(params.stop)
        n_in, n_out, text, reason = prepared.input_token_len, 0, "", None
        token_ids: list[int] = []
        outputs = self._engine.generate(prepared, stream_response=stream or bool(params.stop))
        try:
            async for out in outputs:
                text += out.response  # lmdeploy's incremental text: cheap, and enough while streaming
                token_ids += out.token_ids or []  # each step's new ids, the stop token left out
                n_out, reason = out.generate_token_len, out.finish_reason
                visible = answer.update(text)
                if visible:  # before stopping too: the text up to a stop string is part of the answer
                    yield VLDelta(req.request_id, visible, n_in, n_out)
                if answer.stopped:
                    break
        except Exception as exc:  # lmdeploy reports a failed request by raising at the end
            mapped = _our_error(exc)
            if isinstance(mapped, EngineDeadError):
                raise mapped from (None if mapped is exc else exc)
            yield VLDelta(req.request_id, "", n_in, n_out, finish_reason="error", error=format_error(mapped))
            return
        finally:
            try:
                await outputs.aclose()  # cancels the session in lmdeploy when we stopped reading early
            except Exception:  # noqa: BLE001 - the answer is complete either way
                logger.debug("closing lmdeploy's generator failed", exc_info=True)
        if answer.stopped:
            reason = "stop"
        elif reason not in ("stop", "length"):
            yield VLDelta(req.request_id, "", n_in, n_out, finish_reason="error",
                          error=f"EngineError: lmdeploy ended the request with finish_reason={reason}")
            return
        yield VLDelta(req.request_id, answer.finish(self._decode(token_ids)), n_in, n_out, finish_reason=reason)

    async def stream(self, request: VLRequest, params: SamplingParams) -> AsyncIterator[VLDelta]:
        self._ensure_started()
        prepared = await self._prepare(request, params, self._gen_config(params))
        async for delta in self._deltas(request, prepared, params, stream=True):
            yield delta

    async def _one(self, req: VLRequest, params: SamplingParams, gen_config) -> VLResult:
        try:
            prepared = await self._prepare(req, params, gen_config)
        except RequestError as exc:  # bad input for this request only
            return VLResult.failed(req.request_id, exc)
        pieces: list[str] = []
        last = None
        async for delta in self._deltas(req, prepared, params, stream=False):
            pieces.append(delta.text)
            last = delta
        return VLResult(req.request_id, None if last.error else "".join(pieces), num_input_tokens=last.num_input_tokens,
                        num_output_tokens=last.num_output_tokens, finish_reason=last.finish_reason, error=last.error)

    async def generate(self, requests: Sequence[VLRequest], params: SamplingParams) -> list[VLResult]:
        self._ensure_started()
        gen_config = self._gen_config(params)
        outcomes = await asyncio.gather(*(self._one(r, params, gen_config) for r in requests), return_exceptions=True)
        results = []
        for req, outcome in zip(requests, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, (asyncio.CancelledError, KeyboardInterrupt, EngineDeadError)):
                    raise outcome
                results.append(VLResult(req.request_id, None, finish_reason="error", error=format_error(outcome)))
            else:
                results.append(outcome)
        return results

    def close(self) -> None:
        if self._engine is None:
            return
        if self.preprocess == "raylens":
            self._pool.shutdown(wait=False)
        self._engine.close()
        self._engine = None


# lmdeploy's error codes (serve/core/exceptions.py) that mean the request, not the engine, is at fault.
_REQUEST_CODES = ("invalid_request", "context_length_exceeded", "unsupported_feature", "preprocess_failed")


def _our_error(exc: BaseException) -> BaseException:
    """lmdeploy's RequestError as ours (or EngineDeadError); any other exception as it is."""
    code = getattr(getattr(exc, "code", None), "value", None)
    if code is None or type(exc).__name__ != "RequestError" or isinstance(exc, RequestError):
        return exc
    if code == "engine_unavailable":
        return EngineDeadError(f"lmdeploy: {exc}")
    if code in _REQUEST_CODES:
        return RequestError(f"lmdeploy: {exc}", param="messages")
    return RuntimeError(f"lmdeploy ({code}): {exc}")
