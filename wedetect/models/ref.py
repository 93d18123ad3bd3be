"""WeDetect-Ref: Qwen3-VL turned into a single-pass classifier over region proposals.

The prompt is an ordinary Qwen3-VL chat (image + ``Please detect the "{query}" in the image``) whose
assistant turn is one ``<object>`` token per proposal. Before the language model runs:

* every visual token gets a learned 2-D sine position encoding added (``image_pos_projector``);
* every ``<object>`` token embedding is replaced by an *object embedding* of its box: multi-scale
  RoIAlign over three maps built from the vision tower (stride 8 and 16 from the last two DeepStack
  levels via transposed convolutions, stride 32 = the final merger output), merged per cell and
  projected (``merge`` + ``object_vision_projector``), plus a sine encoding of the box
  (``object_pos_projector``).

One causal forward pass of the stock Qwen3-VL text model follows; ``out_proj`` (hidden -> 1) at each
``<object>`` position gives the proposal logit (no next-token shift). Everything else — vision tower,
M-RoPE, DeepStack injection, attention backends — is transformers' own Qwen3-VL code.

Module and parameter names equal the official checkpoint's, so a released WeDetect-Ref folder loads
strictly. Loading refuses a stage-2 ("grounding") checkpoint, which has the same ``architectures``
string but no ``out_proj``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from transformers import Qwen3VLConfig
from transformers import initialization as init
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel
from transformers.utils import ModelOutput

from wedetect.errors import WeDetectError

OBJECT_TOKEN = "<object>"
# The official training script saves this name for both the stage-2 and the final (stage-3) model;
# saved folders keep it so that they stay loadable by the official code.
OFFICIAL_ARCHITECTURE = "Qwen3VLGroundingForConditionalGeneration"
# Parameters added to the inner Qwen3VLModel (state-dict prefix ``model.``).
REF_MODULES = (
    "image_pos_projector",
    "object_pos_projector",
    "object_vision_projector",
    "second_scale_conv",
    "first_scale_conv1",
    "first_scale_norm",
    "first_scale_conv2",
    "merge",
)
HEAD_KEYS = ("out_proj.weight", "out_proj.bias")
ROI_SIZE = 7
ROI_STRIDES = (8, 16, 32)
# Above this hidden size the official model averages the RoI cells instead of flattening them.
_FLATTEN_MAX_HIDDEN = 4000


class RefCheckpointError(WeDetectError):
    """The folder is not a loadable WeDetect-Ref checkpoint."""


class RefInputError(WeDetectError):
    """Inputs that WeDetect-Ref cannot score (token/box mismatch, malformed boxes)."""


def sine_encode(values: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of scalars: ``(...,) -> (..., dim)``, computed in float32.

    Component ``j`` uses the angle ``2*pi*u / temperature**(2*floor(j/2)/dim)``; even components are
    ``sin``, odd ones ``cos`` (interleaved pairs sharing one frequency), as the official code.
    """
    if dim % 2:
        raise ValueError(f"sine encoding needs an even dimension, got {dim}")
    j = torch.arange(dim, dtype=torch.float32, device=values.device)
    freq = temperature ** (2 * torch.div(j, 2, rounding_mode="floor") / dim)
    angles = values.float()[..., None] * (2 * math.pi) / freq
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def image_position_sine(grid_h: int, grid_w: int, hidden: int, device: torch.device | None = None) -> Tensor:
    """Sine encoding of the merged visual grid, ``(grid_h * grid_w, hidden)`` in raster order.

    Cell (r, c) sits at ``x = c / W' + 0.5``, ``y = r / H' + 0.5`` (the offset is added to the
    normalised index, an official quirk kept for weight compatibility); output ``[enc(y), enc(x)]``.
    """
    ys = torch.arange(grid_h, dtype=torch.float32, device=device) / grid_h + 0.5
    xs = torch.arange(grid_w, dtype=torch.float32, device=device) / grid_w + 0.5
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.cat((sine_encode(y.flatten(), hidden // 2), sine_encode(x.flatten(), hidden // 2)), dim=-1)


def box_position_sine(rois: Tensor, resized_hw: tuple[int, int], hidden: int) -> Tensor:
    """Sine encoding of boxes in resized-image pixels: ``(N, 4) xyxy -> (N, hidden)``.

    Encodes ``(cx, cy, w, h) / (S_w, S_h, S_w, S_h)`` in the order ``[cy, cx, w, h]``.
    """
    s_h, s_w = resized_hw
    rois = rois.float()
    cx = (rois[:, 0] + rois[:, 2]) / 2 / s_w
    cy = (rois[:, 1] + rois[:, 3]) / 2 / s_h
    w = (rois[:, 2] - rois[:, 0]) / s_w
    h = (rois[:, 3] - rois[:, 1]) / s_h
    return torch.cat([sine_encode(v, hidden // 4) for v in (cy, cx, w, h)], dim=-1)


def rois_to_resized(boxes: Tensor, original_wh: tuple[int, int], resized_hw: tuple[int, int]) -> Tensor:
    """Map xyxy boxes from original-image pixels to the resized image the vision tower saw (float32)."""
    w0, h0 = original_wh
    s_h, s_w = resized_hw
    # Divide by the original/resized ratio, the official op order (multiplying differs by ~1 ulp).
    ratio = torch.tensor([w0 / s_w, h0 / s_h, w0 / s_w, h0 / s_h], dtype=torch.float32, device=boxes.device)
    return boxes.float() / ratio


def _mlp(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


@dataclass
class RefVisionFeatures:
    """Vision-tower outputs of one image, everything WeDetect-Ref needs to score any query on it.

    ``embeds`` (H'W', h) is the final merger output E, ``pos_embeds`` the projected grid encoding
    (``embeds + pos_embeds`` replaces the ``<|image_pad|>`` tokens), ``deepstack`` the DeepStack
    merger outputs injected into the first text layers, and ``maps`` the RoI feature maps
    (1, C, H, W) at strides 8, 16 and 32. ``grid_thw`` is the processor's patch grid (1, S_h/p, S_w/p)
    and ``resized_hw`` the resized image size (S_h, S_w) in pixels.
    """

    embeds: Tensor
    pos_embeds: Tensor
    deepstack: list[Tensor]
    maps: tuple[Tensor, Tensor, Tensor]
    grid_thw: Tensor
    resized_hw: tuple[int, int]


@dataclass
class RefModelOutput(ModelOutput):
    """``logits`` (B, L): ``out_proj`` at every position; ``proposal_logits``: per sequence, the
    logits at its ``<object>`` positions (float32, in box order)."""

    logits: Tensor | None = None
    proposal_logits: list[Tensor] | None = None
    last_hidden_state: Tensor | None = None


class WeDetectRefQwen3VLModel(Qwen3VLModel):
    """Qwen3VLModel plus the object embedder and the visual position encoding of WeDetect-Ref."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        if hidden % 8:
            raise ValueError(f"WeDetect-Ref needs a text hidden size divisible by 8, got {hidden}")
        if len(config.vision_config.deepstack_visual_indexes) < 2:
            raise ValueError("WeDetect-Ref needs at least two DeepStack levels in the vision config")
        self.image_pos_projector = _mlp(hidden, hidden)
        self.object_pos_projector = _mlp(hidden, hidden)
        cells = 1 if hidden > _FLATTEN_MAX_HIDDEN else ROI_SIZE * ROI_SIZE
        self.object_vision_projector = _mlp(cells * hidden, hidden)
        self.second_scale_conv = nn.ConvTranspose2d(hidden, hidden // 2, kernel_size=2, stride=2)
        self.first_scale_conv1 = nn.ConvTranspose2d(hidden, hidden // 2, kernel_size=2, stride=2)
        self.first_scale_norm = nn.LayerNorm(hidden // 2)
        self.first_scale_act = nn.GELU()
        self.first_scale_conv2 = nn.ConvTranspose2d(hidden // 2, hidden // 4, kernel_size=2, stride=2)
        self.merge = nn.Linear(hidden // 4 + hidden // 2 + hidden, hidden)
        self.post_init()

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Fresh position projectors start as a no-op (zero last layer), as the official code intends
        # (its init is lost to HF's re-init there). Loaded weights are never touched.
        last_layers = [getattr(self, name)[-1] for name in ("image_pos_projector", "object_pos_projector")
                       if hasattr(self, name)]
        if any(module is layer for layer in last_layers):
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------- vision
    def vision_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> list[RefVisionFeatures]:
        """Run the vision tower once and build, per image, everything the scoring pass needs."""
        out = self.get_image_features(pixel_values, image_grid_thw)
        merge = self.config.vision_config.spatial_merge_size
        patch = self.config.vision_config.patch_size
        features = []
        for i, grid in enumerate(image_grid_thw):
            t, gh, gw = (int(v) for v in grid)
            if t != 1:
                raise RefInputError(f"WeDetect-Ref scores still images; got a temporal grid of {t}")
            h_m, w_m = gh // merge, gw // merge
            embeds = out.pooler_output[i]
            deepstack = [level[i] for level in out.deepstack_features]

            def as_map(x: Tensor, h_m: int = h_m, w_m: int = w_m) -> Tensor:
                return x.reshape(h_m, w_m, -1).permute(2, 0, 1).unsqueeze(0)

            stride32 = as_map(embeds)
            stride16 = self.second_scale_conv(as_map(deepstack[-1]))
            x = self.first_scale_conv1(as_map(deepstack[-2]))
            x = self.first_scale_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            stride8 = self.first_scale_conv2(self.first_scale_act(x))
            pos = image_position_sine(h_m, w_m, self.hidden_size, embeds.device).to(embeds.dtype)
            features.append(
                RefVisionFeatures(
                    embeds=embeds,
                    pos_embeds=self.image_pos_projector(pos),
                    deepstack=deepstack,
                    maps=(stride8, stride16, stride32),
                    grid_thw=grid,
                    resized_hw=(gh * patch, gw * patch),
                )
            )
        return features

    # ---------------------------------------------------------------------------------- objects
    def roi_align_levels(self, maps: Sequence[Tensor], rois: Tensor) -> list[Tensor]:
        """RoIAlign (7x7, adaptive sampling, ``aligned=False``) on the three maps, in float32, cast back."""
        return [
            roi_align(m.float(), [rois.float()], ROI_SIZE, spatial_scale=1.0 / s, sampling_ratio=-1, aligned=False)
            .to(m.dtype)
            for m, s in zip(maps, ROI_STRIDES)
        ]

    def merge_rois(self, levels: Sequence[Tensor]) -> Tensor:
        """Concatenate the levels along channels and mix them per cell: ``(N, 7, 7, h)``."""
        return self.merge(torch.cat(list(levels), dim=1).permute(0, 2, 3, 1))

    def project_rois(self, merged: Tensor) -> Tensor:
        """``(N, 7, 7, h) -> (N, h)``: flatten in (row, col, channel) order (or average for h > 4000)."""
        if self.hidden_size > _FLATTEN_MAX_HIDDEN:
            return self.object_vision_projector(merged.mean(dim=(1, 2)))
        return self.object_vision_projector(merged.flatten(1))

    def embed_objects(self, features: RefVisionFeatures, rois: Tensor) -> Tensor:
        """Object embeddings ``(N, h)`` of boxes given in resized-image pixels."""
        vision = self.project_rois(self.merge_rois(self.roi_align_levels(features.maps, rois)))
        pos = box_position_sine(rois, features.resized_hw, self.hidden_size).to(vision.dtype)
        return vision + self.object_pos_projector(pos)

    # ------------------------------------------------------------------------------------- text
    def build_inputs_embeds(
        self,
        input_ids: Tensor,
        features: Sequence[RefVisionFeatures],
        rois: Sequence[Tensor],
        object_token_id: int,
    ) -> tuple[Tensor, Tensor]:
        """The LLM input: token embeddings with the visual tokens and ``<object>`` tokens replaced.

        Sequence ``b`` holds one image (``features[b]``) and one ``<object>`` per row of ``rois[b]``
        (resized-image pixels), filled left to right. Returns ``(inputs_embeds, image_mask)``.
        """
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        object_mask = input_ids == object_token_id
        for b, (feat, r) in enumerate(zip(features, rois)):
            n_img, n_obj = int(image_mask[b].sum()), int(object_mask[b].sum())
            if n_img != feat.embeds.shape[0]:
                raise RefInputError(f"sequence {b} has {n_img} image tokens but its image gives {feat.embeds.shape[0]}")
            if n_obj != r.shape[0]:
                raise RefInputError(f"sequence {b} has {n_obj} {OBJECT_TOKEN} tokens but {r.shape[0]} boxes")
        visual = torch.cat([f.embeds + f.pos_embeds for f in features]).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual)
        objects = [self.embed_objects(f, r) for f, r in zip(features, rois) if r.shape[0] > 0]
        if objects:
            embeds = embeds.masked_scatter(object_mask.unsqueeze(-1), torch.cat(objects).to(embeds.dtype))
        return embeds, image_mask

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor | None, image_grid_thw: Tensor) -> Tensor:
        """Qwen3-VL M-RoPE ids ``(3, B, L)``; ``<object>`` tokens are ordinary text positions."""
        token_types = (input_ids == self.config.image_token_id).int()
        position_ids, _ = self.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return position_ids

    def score_hidden_states(
        self,
        input_ids: Tensor,
        features: Sequence[RefVisionFeatures],
        rois: Sequence[Tensor],
        object_token_id: int,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The text model's final hidden states ``(B, L, h)`` for the edited inputs (no KV cache)."""
        inputs_embeds, image_mask = self.build_inputs_embeds(input_ids, features, rois, object_token_id)
        grids = torch.stack([f.grid_thw for f in features])
        deepstack = [torch.cat(level) for level in zip(*(f.deepstack for f in features))]
        out = self.language_model(
            input_ids=None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(input_ids, attention_mask, grids),
            visual_pos_masks=image_mask,
            deepstack_visual_embeds=deepstack,
            use_cache=False,
        )
        return out.last_hidden_state


class WeDetectRefForProposalScoring(Qwen3VLPreTrainedModel):
    """WeDetect-Ref (stage 3): Qwen3-VL + object embedder + ``out_proj`` scoring head.

    The stock ``lm_head`` is not built (it is tied to the input embeddings for 2B/4B and unused
    for scoring); an untied ``lm_head.weight`` in a checkpoint is ignored on load.
    """

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: Qwen3VLConfig):
        super().__init__(config)
        self.model = WeDetectRefQwen3VLModel(config)
        self.out_proj = nn.Linear(config.text_config.hidden_size, 1)
        self.post_init()

    @property
    def object_token_id(self) -> int:
        token_id = getattr(self.config, "object_token_id", None)
        if token_id is None:
            raise RefCheckpointError(f"the model config has no object_token_id (the id of {OBJECT_TOKEN})")
        return int(token_id)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # A 0.01 prior on a fresh head, as the official code intends (its init is lost to HF's re-init).
        if module is getattr(self, "out_proj", None):
            init.constant_(module.bias, -math.log(99.0))

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> list[RefVisionFeatures]:
        """Vision features per image; reuse them for any number of queries on the same image."""
        return self.model.vision_features(pixel_values, image_grid_thw)

    def forward(
        self,
        input_ids: Tensor,
        boxes: Sequence[Tensor],
        original_sizes: Sequence[tuple[int, int]],
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        vision_features: Sequence[RefVisionFeatures] | None = None,
    ) -> RefModelOutput:
        """Score the boxes of each sequence.

        Args:
            input_ids: (B, L) with one image and ``len(boxes[b])`` ``<object>`` tokens per row.
            boxes: per sequence, (N_b, 4) xyxy in original-image pixels, in ``<object>`` order.
            original_sizes: per sequence, the original image size (W, H).
            attention_mask: (B, L), for right-padded batches.
            pixel_values, image_grid_thw: processor outputs (one image per sequence), or
            vision_features: precomputed ``encode_images`` outputs, one per sequence.
        """
        if vision_features is None:
            if pixel_values is None or image_grid_thw is None:
                raise RefInputError("pass pixel_values and image_grid_thw, or precomputed vision_features")
            vision_features = self.encode_images(pixel_values, image_grid_thw)
        if not len(vision_features) == len(boxes) == len(original_sizes) == input_ids.shape[0]:
            raise RefInputError(
                f"got {input_ids.shape[0]} sequences, {len(vision_features)} images, {len(boxes)} box sets "
                f"and {len(original_sizes)} image sizes; they must match"
            )
        rois = [rois_to_resized(b, wh, f.resized_hw) for b, wh, f in zip(boxes, original_sizes, vision_features)]
        hidden = self.model.score_hidden_states(
            input_ids, vision_features, rois, self.object_token_id, attention_mask=attention_mask
        )
        logits = self.out_proj(hidden).squeeze(-1).float()
        object_mask = input_ids == self.object_token_id
        return RefModelOutput(
            logits=logits,
            proposal_logits=[logits[b][object_mask[b]] for b in range(logits.shape[0])],
            last_hidden_state=hidden,
        )


# ------------------------------------------------------------------------------------ checkpoints
def _weight_keys(folder: Path) -> set[str]:
    """Tensor names stored in a HF checkpoint folder (read from the index or the file header)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    found = sorted(p.name for p in folder.iterdir())
    raise RefCheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (found: {', '.join(found) or 'nothing'})"
    )


def check_ref_keys(keys: set[str], folder: Path) -> None:
    """Reject folders that are not a stage-3 WeDetect-Ref checkpoint, naming what they look like."""
    missing_modules = [m for m in REF_MODULES if not any(k.startswith(f"model.{m}.") for k in keys)]
    if missing_modules:
        kind = "a plain Qwen3-VL checkpoint" if len(missing_modules) == len(REF_MODULES) else "an incomplete checkpoint"
        raise RefCheckpointError(
            f"{folder} is not a WeDetect-Ref checkpoint ({kind}): missing the Ref modules "
            f"{', '.join(missing_modules)}"
        )
    if not all(k in keys for k in HEAD_KEYS):
        raise RefCheckpointError(
            f"{folder} has no out_proj scoring head: this is a WeDetect-Ref stage-2 (grounding) checkpoint, "
            "which cannot score proposals. Use the final (stage-3) WeDetect-Ref checkpoint."
        )


def object_token_id_from_tokenizer(tokenizer, vocab_size: int, folder: Path | str) -> int:
    """The id of ``<object>``, checked to be one added token inside the embedding table."""
    token_id = tokenizer.convert_tokens_to_ids(OBJECT_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise RefCheckpointError(
            f"the tokenizer in {folder} has no {OBJECT_TOKEN} token; WeDetect-Ref checkpoints add it as a "
            "special token (tokenizer.add_tokens(['<object>'], special_tokens=True))"
        )
    if tokenizer.encode(OBJECT_TOKEN * 2, add_special_tokens=False) != [token_id, token_id]:
        raise RefCheckpointError(f"the tokenizer in {folder} splits {OBJECT_TOKEN}: it must be an added special token")
    if not 0 <= token_id < vocab_size:
        raise RefCheckpointError(f"{OBJECT_TOKEN} id {token_id} lies outside the embedding table ({vocab_size} rows)")
    return int(token_id)


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attention 2 when installed and usable (CUDA, half precision), SDPA otherwise."""
    from transformers.utils import is_flash_attn_2_available

    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def load_ref_model(
    folder: str | Path,
    tokenizer,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> WeDetectRefForProposalScoring:
    """Load a WeDetect-Ref checkpoint folder strictly: every model tensor present, none ignored."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise RefCheckpointError(f"{folder} is not a WeDetect-Ref checkpoint folder (no config.json)")
    check_ref_keys(_weight_keys(folder), folder)
    config = Qwen3VLConfig.from_pretrained(folder)
    if config.model_type != "qwen3_vl":
        raise RefCheckpointError(f"{folder}: expected a Qwen3-VL config (model_type qwen3_vl), got {config.model_type}")
    token_id = object_token_id_from_tokenizer(tokenizer, config.text_config.vocab_size, folder)
    stored = getattr(config, "object_token_id", None)
    if stored is not None and int(stored) != token_id:
        raise RefCheckpointError(
            f"{folder}: config object_token_id {stored} != the tokenizer's {OBJECT_TOKEN} id {token_id}"
        )
    config.object_token_id = token_id
    device = torch.device(device)
    attn = attn_implementation or default_attn_implementation(device, dtype)
    try:
        # Size mismatches are collected (not raised by transformers) so the error can name them.
        model, info = WeDetectRefForProposalScoring.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            attn_implementation=attn,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise RefCheckpointError(f"cannot load {folder}: {e}") from e
    problems = [f"{kind.replace('_', ' ')}: {', '.join(sorted(info[kind])[:10])}"
                for kind in ("missing_keys", "unexpected_keys") if info.get(kind)]
    if info.get("mismatched_keys"):
        shapes = [f"{k} {tuple(ckpt)} in the checkpoint, {tuple(model_shape)} in the model"
                  for k, ckpt, model_shape in sorted(info["mismatched_keys"])[:10]]
        problems.append(f"shape mismatch: {'; '.join(shapes)}")
    if info.get("error_msgs"):
        problems.append(f"errors: {'; '.join(map(str, info['error_msgs']))}")
    if problems:
        raise RefCheckpointError(f"{folder} does not match the WeDetect-Ref architecture ({' | '.join(problems)})")
    return model.to(device).eval()


def save_ref_model(model: WeDetectRefForProposalScoring, folder: str | Path) -> None:
    """Save the weights and config in the official folder layout (same key names and architectures)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [OFFICIAL_ARCHITECTURE]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
