"""Public inference API: ``WeDetect`` (open-vocabulary detector) and ``WeDetectUni`` (proposals)."""
from __future__ import annotations

import itertools
import os
import threading
import warnings
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import build_from_checkpoint, load_official, save_official
from .config import ModelConfig
from .data.device_letterbox import letterbox_on_device
from .data.io import ImageInput, ImageReadError, image_name, load_bgr, load_pil_rgb
from .data.letterbox import detector_geometry, letterbox_detector, letterbox_uni, to_tensor, uni_geometry
from .errors import WeDetectError
from .models.detector import WeDetectClosedSetModel, WeDetectModel, WeDetectUniModel
from .models.head import flatten_levels
from .postprocess import (
    PostprocessConfig,
    UniPostprocessConfig,
    detector_postprocess,
    detector_postprocess_fast,
    uni_postprocess,
    uni_postprocess_fast,
)
from .structures import Detections, LetterboxMeta

BLANK_PROMPT = " "  # the official demo appends this prompt after the user's classes
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise WeDetectError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WeDetectError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeDetectError(f"device {device!r} requested but CUDA is not available")
    return dev


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    # bytes and tensors are iterable but are one (unsupported) image each: decoding reports them by type.
    if isinstance(images, (str, os.PathLike, np.ndarray, bytes, torch.Tensor)) or not isinstance(images, Iterable):
        return [images]
    return list(images)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WeDetectError(f"{name} must be a positive integer, not {value!r}")


# Post-processing threads of accelerate(overlap=True): on a CPU post-processing computes, so one thread
# beside the network is enough; on a GPU it mostly waits, so a few threads (each image on its thread's
# own stream) overlap their waits.
POST_THREADS_CPU, POST_THREADS_CUDA = 1, 4
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
POSTPROCESS_MODES = ("fast", "reference")


def _check_mode(mode: str) -> str:
    if mode not in POSTPROCESS_MODES:
        raise WeDetectError(f"mode must be 'fast' or 'reference', not {mode!r}")
    return mode


def _fetch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the CPU, with one wait for the device: the copies are queued, then the stream syncs."""
    if not tensors[0].is_cuda:
        return tensors
    out = tuple(t.to("cpu", non_blocking=True) for t in tensors)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return out


def _clone_tensors(out):
    """Tensors of a (nested) tuple/list of network outputs, cloned."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_clone_tensors(o) for o in out)


class _Runner:
    """Shared batching: decode + letterbox each image, run the network per batch, post-process."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    channels_last: bool = False
    _compiled: Callable | None = None
    # Threads that decode and letterbox images ahead of the network (OpenCV and Pillow release the GIL).
    preprocess_workers: int = min(8, os.cpu_count() or 1)
    # Resize + pad on the inference device instead of the CPU threads (see accelerate()).
    device_letterbox: bool = False
    # Post-process each batch on a worker thread while the network runs on the next (see accelerate()).
    overlap: bool = False
    _cudagraphs: bool = False
    _letterbox_style: str  # "detector" (OpenCV rules, BGR in) or "uni" (Pillow rules, RGB in)

    def accelerate(
        self,
        channels_last: bool | None = None,
        compile: str | bool | None = None,
        preprocess_workers: int | None = None,
        device_letterbox: bool | None = None,
        overlap: bool | None = None,
    ) -> "_Runner":
        """Opt-in speed settings; returns ``self``. An option left out keeps its value, so calls combine.

        ``channels_last`` keeps images and activations NHWC (faster convolutions on tensor-core GPUs).
        ``compile`` runs network + box decoding through ``torch.compile`` in that mode (one of
        ``COMPILE_MODES``; ``"reduce-overhead"`` also replays CUDA graphs; ``False`` turns it off). Shapes
        are static: the first batch of each size compiles (tens of seconds), later ones reuse it. Outputs
        stay equal to the default path up to float rounding (tested). ``preprocess_workers`` sets the
        number of threads that decode and letterbox images ahead of the network (default ``min(8, CPUs)``;
        results are identical). ``device_letterbox`` moves resizing and padding from those threads to the
        inference device (they only decode): a CPU saving for fast GPUs, at most one grey level off the
        official input on ~0.1 % of pixels. ``overlap`` post-processes each batch on worker threads (on
        CUDA ``POST_THREADS_CUDA``, each image on its thread's own stream) while the network runs on the
        next batch; results are identical.
        """
        if compile not in (None, False) and compile not in COMPILE_MODES:
            raise WeDetectError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {compile!r}")
        if preprocess_workers is not None:
            if preprocess_workers < 1:
                raise WeDetectError("preprocess_workers must be at least 1")
            self.preprocess_workers = preprocess_workers
        if device_letterbox is not None:
            self.device_letterbox = device_letterbox
        if overlap is not None:
            self.overlap = overlap
        if channels_last is not None:
            self.channels_last = channels_last
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            for part in self.model.children():
                if part is not getattr(self.model, "text_tower", None):
                    part.to(memory_format=fmt)
        if compile is not None:
            # Recompiled on every call that names it: the memory format may have changed.
            self._compiled = torch.compile(self._network, mode=compile, dynamic=False) if compile else None
            self._cudagraphs = compile == "reduce-overhead"
        return self

    def _network(self, batch: torch.Tensor, *extra: torch.Tensor):
        raise NotImplementedError

    def _call_network(self, batch: torch.Tensor, *extra: torch.Tensor):
        batch = batch.to(self.device, self.dtype)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = (self._compiled or self._network)(batch, *extra)
        if self._cudagraphs and self.overlap:
            # A CUDA-graph replay writes its outputs into the same buffers each time; the batch still in
            # post-processing must not see the next replay's values.
            out = _clone_tensors(out)
        return out

    def _prepare(self, image: ImageInput) -> tuple[np.ndarray, LetterboxMeta]:
        raise NotImplementedError

    def _prepared(self, items: list[ImageInput]) -> Iterable[tuple[np.ndarray, LetterboxMeta] | ImageReadError]:
        """``_prepare`` of each item in order (an unreadable image yields its error), computed by
        ``preprocess_workers`` threads at most a few images ahead of the consumer."""

        def prepare(image: ImageInput) -> tuple[np.ndarray, LetterboxMeta] | ImageReadError:
            try:
                return self._prepare(image)
            except ImageReadError as e:
                return e

        workers = max(1, int(self.preprocess_workers))
        if workers == 1 or len(items) < 2:
            yield from map(prepare, items)
            return
        todo = iter(items)
        with ThreadPoolExecutor(workers, thread_name_prefix="wedetect-prepare") as pool:
            ahead = deque(pool.submit(prepare, image) for image in itertools.islice(todo, 2 * workers))
            while ahead:
                done = ahead.popleft().result()
                for image in itertools.islice(todo, 1):
                    ahead.append(pool.submit(prepare, image))
                yield done

    def _run(
        self,
        images: ImageInput | Sequence[ImageInput],
        batch_size: int,
        progress: bool,
        on_error: str,
        forward: Callable[[torch.Tensor], tuple],
        post: Callable[[tuple, int, LetterboxMeta], Detections],
    ) -> list[Detections]:
        """Batches ``images`` through ``forward`` (the network: asynchronous on GPUs) and ``post``
        (post-processing of image ``j`` of one batch's outputs into its ``Detections``)."""
        if on_error not in ("raise", "skip"):
            raise WeDetectError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        _check_count("batch_size", batch_size)
        items = _as_list(images)
        results: list[Detections | None] = [None] * len(items)
        pending: list[tuple[int, np.ndarray, LetterboxMeta]] = []
        def store(i: int, det: Detections) -> None:
            det.path = image_name(items[i], i)
            results[i] = det

        overlap = _Overlap(self.device, store) if self.overlap else None

        def flush() -> None:
            indices, arrays, metas = zip(*pending)
            pending.clear()
            if self.device_letterbox:
                batch = letterbox_on_device(list(arrays), list(metas), self._letterbox_style, self.device)
            else:
                batch = to_tensor(list(arrays), self.device)
            raw = forward(batch.to(self.dtype))
            if overlap is None:
                for j, (i, meta) in enumerate(zip(indices, metas)):
                    store(i, post(raw, j, meta))
            else:
                overlap.submit(post, raw, metas, indices)

        try:
            prepared = self._prepared(items)
            for i, out in enumerate(tqdm(prepared, total=len(items), desc="images", unit="img",
                                         disable=not progress)):
                if isinstance(out, ImageReadError):
                    if on_error == "raise":
                        raise out
                    results[i] = Detections.failed(image_name(items[i], i), str(out))
                    continue
                pending.append((i, *out))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
            if overlap is not None:
                overlap.collect()
        finally:
            if overlap is not None:
                overlap.close()
        return results  # type: ignore[return-value]


class _Overlap:
    """Post-processes one batch on worker threads while the caller runs the network on the next.

    Post-processing is a chain of small, data-dependent steps that wait for the device (counts, NMS);
    run inline, the GPU idles during it and the host idles during the network. Here each image is
    post-processed on a worker thread and, on CUDA, that thread's own stream, which first waits for the
    network's outputs (an event): its waits never include the next batch's network nor another image's
    work, so on a GPU several images wait at once. At most one batch is in post-processing: ``submit``
    first collects the previous one. Results are those of the inline path.
    """

    def __init__(self, device: torch.device, store: Callable[[int, Detections], None]) -> None:
        self.device = device
        self.store = store  # receives (input index, Detections) in input order
        self.cuda = device.type == "cuda"
        threads = POST_THREADS_CUDA if self.cuda else POST_THREADS_CPU
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="wedetect-post")
        self.local = threading.local()
        self.job: list[tuple[int, Future]] | None = None

    def submit(self, post: Callable, raw: tuple, metas: Sequence[LetterboxMeta], indices: Sequence[int]) -> None:
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # after the network's kernels
        self.collect()
        self.job = [(i, self.pool.submit(self._work, post, raw, j, meta, ready))
                    for j, (i, meta) in enumerate(zip(indices, metas))]

    def _work(self, post: Callable, raw: tuple, j: int, meta: LetterboxMeta, ready) -> Detections:
        with torch.inference_mode():  # thread-local, like the caller's
            if not self.cuda:
                return post(raw, j, meta)
            stream = getattr(self.local, "stream", None)
            if stream is None:
                stream = self.local.stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                for t in raw:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(stream)  # the allocator must not hand them to the next batch early
                return post(raw, j, meta)

    def collect(self) -> None:
        if self.job is not None:
            futures, self.job = self.job, None
            for i, future in futures:
                self.store(i, future.result())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class WeDetect(_Runner):
    """Open-vocabulary detector: set class names once, then detect them in any number of images.

    >>> model = WeDetect.from_pretrained("wedetect_base.pth", tokenizer="xlm-roberta-base/tokenizer.json")
    >>> model.set_classes(["鞋", "床"])
    >>> results = model.predict(["a.jpg"], threshold=0.3)
    """

    def __init__(
        self,
        model: WeDetectModel,
        tokenizer=None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        postprocess: PostprocessConfig = PostprocessConfig(),
        mode: str = "fast",
    ) -> None:
        self.mode = _check_mode(mode)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.eval().to(self.device)
        # The text tower runs once per class list, so it stays in float32; the vision path takes `dtype`.
        for part in (model.image_tower, model.neck, model.head):
            part.to(self.dtype)
        self.tokenizer = tokenizer
        self.postprocess_cfg = postprocess
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._class_embeds: torch.Tensor | None = None
        self._prompts: list[str] = []
        self._num_classes = 0

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        tokenizer=None,
        size: str | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        strict: bool = True,
        mode: str = "fast",
        class_names: Sequence[str] | None = None,
    ) -> "WeDetect":
        """Load an official (or our) detector checkpoint; ``tokenizer`` is a path, hub name or tokenizer.

        ``mode="reference"`` runs post-processing literally in the official order; ``"fast"`` (default)
        uses exact shortcuts (see ``postprocess.detector_postprocess_fast``; exactly tied scores may
        resolve differently).
        A closed-set checkpoint (fixed classifier, no text tower) is ready to predict at once; its class
        names come from ``class_names``, else the checkpoint's ``meta.dataset_meta.classes``.
        """
        from .models.text import load_tokenizer

        ckpt = load_official(checkpoint, ("detector", "closed_set"))
        model = build_from_checkpoint(ckpt, size=size, strict=strict)
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        out = cls(model, tok, device=device, dtype=dtype, mode=mode)
        if isinstance(model, WeDetectClosedSetModel):
            rows = model.prompts.shape[0]
            names = list(class_names or ckpt.meta.get("dataset_meta", {}).get("classes", [])
                         or [f"class_{i}" for i in range(rows)])
            if len(names) != rows:
                raise WeDetectError(f"{len(names)} class names for a closed-set checkpoint with {rows} classes")
            out._set(model.prompts.detach().float().to(out.device), names, rows)
        return out

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def class_names(self) -> list[str]:
        return self._prompts[: self._num_classes]

    @property
    def is_closed_set(self) -> bool:
        """A closed-set checkpoint: no text tower, the classes are its classifier rows."""
        return self.model.text_tower is None

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights in the official checkpoint layout (.pth or .safetensors)."""
        save_official(self.model, path)

    # -- text ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (K, 768), float32, from already tokenised prompts."""
        return self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device)).float()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings (K, 768) of prompts, tokenised together as the official code does.

        Results are cached per prompt list, so repeated queries cost nothing.
        """
        texts = list(texts)
        if not texts:
            raise WeDetectError("no text to embed")
        if any(not isinstance(t, str) for t in texts):
            raise WeDetectError("prompts must be strings")
        key = tuple(texts)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if self.tokenizer is None:
            from .models.text import load_tokenizer

            self.tokenizer = load_tokenizer(None)  # raises with instructions unless WEDETECT_TOKENIZER is set
        tokens = self.tokenizer(texts, return_tensors="pt", padding=True)
        emb = self.encode_token_ids(tokens["input_ids"], tokens["attention_mask"])
        self._text_cache[key] = emb
        if len(self._text_cache) > 64:
            self._text_cache.popitem(last=False)
        return emb

    def set_classes(self, names: str | Sequence[str], blank: bool = True) -> None:
        """Use these class names as prompts (the official blank ``' '`` prompt is appended unless ``blank=False``).

        A single string is one class. A name given twice is kept (the official LVIS lists repeat names) with a
        warning: each of its detections is then reported once per label.
        """
        if self.model.text_tower is None:
            raise WeDetectError("this is a closed-set model: its classes are fixed by the checkpoint")
        if isinstance(names, str):
            names = [names]
        elif not isinstance(names, Iterable):
            raise WeDetectError(f"class names must be a string or a list of strings, not {type(names).__name__}")
        names = list(names)
        if not names:
            raise WeDetectError("no class names given")
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise WeDetectError("class names must be non-empty strings")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            warnings.warn(f"class names given more than once: {', '.join(repeated)}; their detections repeat "
                          "under each label", stacklevel=2)
        prompts = names + ([BLANK_PROMPT] if blank else [])
        self._set(self.encode_text(prompts), prompts, len(names))

    def set_class_embeddings(
        self, embeddings: torch.Tensor | np.ndarray, names: Sequence[str], blank_embedding=None
    ) -> None:
        """Use precomputed prompt embeddings (K, 768), e.g. from ``wedetect class-embeddings``."""
        emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.config.embed_dim or emb.shape[0] != len(names):
            raise WeDetectError(
                f"embeddings must be (len(names)={len(names)}, {self.config.embed_dim}); got {tuple(emb.shape)}"
            )
        prompts = list(names)
        if blank_embedding is not None:
            emb = torch.cat([emb, torch.as_tensor(blank_embedding).reshape(1, -1).to(emb)])
            prompts.append(BLANK_PROMPT)
        self._set(emb.float().to(self.device), prompts, len(names))

    def _set(self, emb: torch.Tensor, prompts: list[str], num_classes: int) -> None:
        self._class_embeds, self._prompts, self._num_classes = emb, prompts, num_classes

    # -- images ---------------------------------------------------------------------------------------
    _letterbox_style = "detector"

    def _prepare(self, image: ImageInput) -> tuple[np.ndarray, LetterboxMeta]:
        bgr = load_bgr(image)
        if self.device_letterbox:
            return bgr, detector_geometry(*bgr.shape[:2], self.config.input_size)[2]
        return letterbox_detector(bgr, self.config.input_size)

    @torch.inference_mode()
    def forward_raw(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network only: flattened logits (B, N, K) and decoded input-pixel boxes (B, N, 4), float32."""
        if self._class_embeds is None:
            raise WeDetectError("call set_classes() (or set_class_embeddings()) before predicting")
        text = self._class_embeds.to(self.dtype).expand(batch.shape[0], -1, -1)
        logits, boxes = self._call_network(batch, text)
        return logits.float(), boxes.float()

    def _network(self, batch: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode(*self.model(batch, text))

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = 0.3,
        max_detections: int = 100,
        batch_size: int = 8,
        keep_blank: bool = False,
        progress: bool = False,
        on_error: str = "raise",
    ) -> list[Detections]:
        """Detect the current classes; one ``Detections`` per image, sorted by score.

        The official post-processing (score > 0.001, NMS 0.7, best 300) runs first; then detections with
        score > ``threshold`` are kept, at most ``max_detections`` (the official demo's --threshold/--topk).
        Detections of the blank prompt are dropped unless ``keep_blank``. ``on_error="skip"`` returns a
        failed ``Detections`` (with ``error`` set) for unreadable images instead of raising.
        """

        _check_count("max_detections", max_detections)

        def post(raw: tuple[torch.Tensor, torch.Tensor], j: int, meta: LetterboxMeta) -> Detections:
            lg, bx = raw[0][j], raw[1][j]
            if self.mode == "fast":
                b, s, lab = detector_postprocess_fast(lg, bx, meta, self.postprocess_cfg, threshold)
            else:
                b, s, lab = detector_postprocess(lg, bx, meta, self.postprocess_cfg)
            keep = s > threshold
            if not keep_blank:
                keep &= lab < self._num_classes
            idx = keep.nonzero().view(-1)[:max_detections]
            b, s, lab = _fetch(b[idx], s[idx], lab[idx])
            return Detections(b, s, lab, [self._prompts[i] for i in lab.tolist()], image_size=meta.orig_size)

        return self._run(images, batch_size, progress, on_error, self.forward_raw, post)


class WeDetectUni(_Runner):
    """Class-agnostic proposals with per-box embeddings, as the official proposal script computes them."""

    def __init__(
        self,
        model: WeDetectUniModel,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        postprocess: UniPostprocessConfig = UniPostprocessConfig(),
        mode: str = "fast",
    ) -> None:
        self.mode = _check_mode(mode)
        self.postprocess_cfg = postprocess
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.eval().to(self.device, self.dtype)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        size: str | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = "float32",
        strict: bool = True,
        mode: str = "fast",
    ) -> "WeDetectUni":
        """Load an official Uni checkpoint. ``mode`` as for ``WeDetect.from_pretrained`` (see
        ``postprocess.uni_postprocess_fast``)."""
        model = build_from_checkpoint(load_official(checkpoint, "uni"), size=size, strict=strict)
        return cls(model, device=device, dtype=dtype, mode=mode)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def save(self, path: str | os.PathLike) -> None:
        save_official(self.model, path)

    _letterbox_style = "uni"

    def _prepare(self, image: ImageInput) -> tuple[np.ndarray, LetterboxMeta]:
        rgb = load_pil_rgb(image)
        if self.device_letterbox:
            return np.array(rgb), uni_geometry(rgb.height, rgb.width, self.config.input_size)[2]
        return letterbox_uni(rgb, self.config.input_size)

    @torch.inference_mode()
    def forward_raw(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened embeddings (B, N, 768), objectness logits (B, N, P), boxes (B, N, 4), level per prior (N,)."""
        embeds, flat_logits, boxes = self._call_network(batch)
        # Filled on the device: a copy from pageable host memory would wait for the network to finish.
        levels = torch.cat([torch.full((e.shape[-2] * e.shape[-1],), i, dtype=torch.int64, device=boxes.device)
                            for i, e in enumerate(embeds)])
        return flatten_levels(embeds).float(), flat_logits.float(), boxes.float(), levels

    def _network(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        embeds, logits, reg_raw = self.model(batch)
        return (embeds, *self.model.decode(logits, reg_raw))

    def propose(
        self,
        images: ImageInput | Sequence[ImageInput],
        num_proposals: int = 300,
        score_threshold: float = 0.0,
        batch_size: int = 8,
        progress: bool = False,
        on_error: str = "raise",
    ) -> list[Detections]:
        """Best ``num_proposals`` proposals per image with score > ``score_threshold`` (the official script
        keeps > 0.1). ``labels`` holds the objectness prompt that selected each box."""
        _check_count("num_proposals", num_proposals)
        contrasts = self.model.head.cls_contrasts
        scale = torch.stack([c.logit_scale.detach().float() for c in contrasts]).to(self.device)
        bias = torch.stack([c.bias.detach().float() for c in contrasts]).to(self.device)

        def post(raw: tuple[torch.Tensor, ...], j: int, meta: LetterboxMeta) -> Detections:
            embeds, logits, boxes, levels = raw
            if self.mode == "fast":
                b, s, lab, prior = uni_postprocess_fast(logits[j], boxes[j], meta, num_proposals,
                                                        self.postprocess_cfg, score_threshold)
            else:
                b, s, lab, prior = uni_postprocess(logits[j], boxes[j], meta, num_proposals, self.postprocess_cfg)
            idx = (s > score_threshold).nonzero().view(-1)
            prior = prior[idx]
            lvl = levels[prior]
            b, s, lab, e, lvl, ls, lb = _fetch(b[idx], s[idx], lab[idx], embeds[j][prior], lvl, scale[lvl], bias[lvl])
            return Detections(b, s, lab, [""] * len(s), image_size=meta.orig_size,
                              embeddings=e, levels=lvl, logit_scale=ls, logit_bias=lb)

        return self._run(images, batch_size, progress, on_error, self.forward_raw, post)
