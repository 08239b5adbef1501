"""Request options and response bodies of the HTTP API (pydantic v2; examples feed /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- request options (query parameters, or fields of a JSON body) ----


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotate: Literal["png", "jpeg"] | None = Field(
        None, description="Also draw the answer on the image (see service/surfaces/demo.py for the response shape)."
    )
    version: str | None = Field(
        None,
        pattern=r"^[0-9]+$",
        description="Answer with this loaded version of the model (see /models); default: the current one (or "
        "the canary, for its share of requests). A query parameter of the task routes.",
    )


    explain: Literal["occlusion", "saliency", "gradcam"] | None = Field(
        None,
        description="Also explain each answer with a heatmap (README, Explanations): `occlusion` (any backend; "
        "the drop in the answer's score when each cell of a grid is covered), `saliency` and `gradcam` "
        "(classifier on the embedded backend: gradients through the exported model). Costs extra model "
        "passes: images x (explain_grid^2 + 1) for occlusion, images x 3 for the others.",
    )
    explain_grid: int | None = Field(
        None, ge=2, le=64, description="Cells per side of the explanation's grid (default 8; the gateway's "
        "explain_max_grid, 16 by default, bounds it: past it 422)."
    )  # fmt: skip
    explain_overlay: bool = Field(
        False, description="Also return each explanation as a base64 PNG: the map over the image (explain only)."
    )


class ClassifyOptions(_Options):
    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return, best first.")
    explain_class: str | None = Field(
        None,
        max_length=200,
        description="The class to explain (a label, or a class id): default the top class.",
    )


class _ExplainTop(BaseModel):
    explain_top: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Explain this many answers per image, best first (detections or classes; default and "
        "most: the gateway's explain_max_targets, 10 by default; past it 422).",
    )


class DetectOptions(_ExplainTop, _Options):
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Drop detections scoring below this.")
    max_detections: int = Field(100, ge=1, le=1000, description="Return at most this many detections per image.")


class SegmentOptions(_ExplainTop, _Options):
    return_png: bool = Field(
        False,
        description="Also return the class-index mask as a base64 palette PNG (scaled down to 4 megapixels "
        "for larger images).",
    )
    return_polygons: bool = Field(
        False,
        description="Also return each class's regions as polygons with holes, in original-image pixels "
        "(traced on the segmenter's own mask, simplified by polygon_tolerance; at most 10000 vertices per "
        "class, largest regions first).",
    )
    polygon_tolerance: float = Field(
        1.0,
        ge=0.0,
        le=1000.0,
        description="Simplification of return_polygons in original-image pixels (Douglas-Peucker, topology "
        "kept): traced vertices stay within this distance, or twice it near a ring's start; 0 keeps them all.",
    )


class _ImagesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        ...,
        min_length=1,
        description="Base64-encoded image files (JPEG, PNG, WebP, ...); a `data:image/...;base64,` prefix is allowed. "
        "At most `max_images_per_request` (16 by default) entries; more: 413 `too_many_images`.",
        examples=[["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"]],
    )


class ClassifyRequest(_ImagesBody, ClassifyOptions):
    """JSON body for /classify: base64 images plus the same options as the query parameters."""


class DetectRequest(_ImagesBody, DetectOptions):
    """JSON body for /detect: base64 images plus the same options as the query parameters."""


class SegmentRequest(_ImagesBody, SegmentOptions):
    """JSON body for /segment: base64 images plus the same options as the query parameters."""


# ---- responses ----


class ImageSize(BaseModel):
    width: int = Field(..., description="Width of the image as decoded (after EXIF rotation).", examples=[640])
    height: int = Field(..., examples=[480])


class Explanation(BaseModel):
    """Why the model gave one answer: a grid of numbers over the image region the model saw."""

    method: Literal["occlusion", "saliency", "gradcam"]
    target: str = Field(..., description="The label explained.", examples=["circle"])
    target_id: int = Field(..., description="Its class id.", examples=[0])
    score: float = Field(..., description="The answer's score on the whole image (segmenter: 1, its region kept).")
    grid_size: int = Field(..., description="Cells per side of `grid`.", examples=[8])
    grid: list[list[float]] = Field(
        ...,
        description="grid_size rows (top to bottom) of grid_size cells (left to right) over `region`. occlusion: "
        "the drop of the score when the cell is covered with the image's mean colour (classifier: probability; "
        "detector: the box's score, 0 when no box of its label overlaps it by IoU 0.5; segmenter: the share of "
        "the class's predicted region still predicted). saliency: the mean absolute input gradient of the "
        "class's logit; gradcam: Grad-CAM of the class's logit; both scaled so the largest cell is 1.",
    )
    region: list[float] = Field(
        ...,
        min_length=4,
        max_length=4,
        description="[x1, y1, x2, y2] in original-image pixels: the part of the image the model saw, which the "
        "grid covers (the classifier's centre crop; the whole image for the others).",
    )
    passes: int = Field(..., description="Model passes this image's explanations took (shared by its targets).")
    overlay_png: str | None = Field(None, description="Base64 PNG of the map over the image (explain_overlay).")


class ClassScore(BaseModel):
    class_id: int = Field(..., examples=[2])
    label: str = Field(..., examples=["triangle"])
    score: float = Field(..., ge=0.0, le=1.0, examples=[0.97])


class ClassificationResult(BaseModel):
    image: ImageSize
    predictions: list[ClassScore] = Field(..., description="Top-k classes, highest probability first.")
    explanation: Explanation | None = Field(None, description="Only with explain: why explain_class (or the top class).")


class Detection(BaseModel):
    box: list[float] = Field(
        ...,
        min_length=4,
        max_length=4,
        description="[x1, y1, x2, y2] in original-image pixels, clipped to the image.",
        examples=[[12.5, 40.0, 96.0, 120.25]],
    )
    class_id: int = Field(..., description="Index into the detector's labels (0 is background).", examples=[1])
    label: str = Field(..., examples=["circle"])
    score: float = Field(..., ge=0.0, le=1.0, examples=[0.91])
    explanation: Explanation | None = Field(None, description="Only with explain, for the best explain_top.")


class DetectionResult(BaseModel):
    image: ImageSize
    detections: list[Detection] = Field(..., description="Highest score first.")


class RLE(BaseModel):
    size: list[int] = Field(..., description="[height, width], as in COCO.", examples=[[480, 640]])
    counts: str = Field(..., description="COCO compressed RLE string (pycocotools.mask.decode reads it).")


class Polygon(BaseModel):
    exterior: list[list[float]] = Field(
        ...,
        description="Outer boundary [[x, y], ...] in original-image pixels (pixel (0, 0) covers [0, 1]x[0, 1]); "
        "the first vertex is not repeated at the end.",
        examples=[[[10.0, 10.5], [40.5, 10.0], [40.0, 30.5], [10.5, 30.0]]],
    )
    holes: list[list[list[float]]] = Field(default_factory=list, description="Inner boundaries, as `exterior`.")


class Segment(BaseModel):
    class_id: int = Field(..., examples=[1])
    label: str = Field(..., examples=["circle"])
    pixel_fraction: float = Field(..., ge=0.0, le=1.0, description="Share of the image's pixels in this class.")
    rle: RLE
    polygons: list[Polygon] | None = Field(
        None, description="The class's regions, largest first (only with return_polygons)."
    )
    explanation: Explanation | None = Field(None, description="Only with explain, for the largest explain_top.")


class SegmentationResult(BaseModel):
    image: ImageSize
    class_fractions: dict[str, float] = Field(
        ..., description="Pixel fraction of every class, background included.", examples=[{"background": 0.8}]
    )
    segments: list[Segment] = Field(..., description="One binary mask per class present (background excluded).")
    png: str | None = Field(
        None,
        description="Base64 palette PNG of class indices (only with return_png): at original size, or scaled "
        "down (nearest) to at most 4 megapixels when the image is larger.",
    )


class _TaskResponse(BaseModel):
    model: str = Field(..., examples=["classifier"])
    version: str = Field(..., examples=["1"])
    backend: Literal["embedded", "triton"]


class ClassifyResponse(_TaskResponse):
    results: list[ClassificationResult] = Field(..., description="One per image, in request order.")


class DetectResponse(_TaskResponse):
    results: list[DetectionResult] = Field(..., description="One per image, in request order.")


class SegmentResponse(_TaskResponse):
    results: list[SegmentationResult] = Field(..., description="One per image, in request order.")


class VersionInfo(BaseModel):
    """One loaded version of a model (the contract, labels and input size are the model's, shared)."""

    version: str = Field(..., examples=["2"])
    role: Literal["current", "previous", "candidate", "loaded"] = Field(
        ..., description="current: answers requests that ask for no version; previous: what rollback restores; "
        "candidate: shadowed or canaried (see candidate_mode)"
    )
    candidate_mode: Literal["shadow", "canary"] | None = None
    candidate_share: float | None = None
    weights: str = Field(..., examples=["demo"])
    input_size: ImageSize
    labels: list[str]


class ModelInfo(BaseModel):
    name: str = Field(..., examples=["detector"])
    version: str = Field(..., examples=["1"])
    task: str = Field(..., examples=["detection"])
    endpoint: str = Field(..., examples=["/detect"])
    backend: Literal["embedded", "triton"]
    input_size: ImageSize
    preprocess: str = Field(..., examples=["letterbox"])
    max_batch_size: int = Field(..., examples=[8])
    weights: str = Field(..., examples=["demo"])
    labels: list[str] = Field(..., examples=[["__background__", "circle", "square"]])
    versions: list[VersionInfo] = Field(
        default_factory=list, description="every loaded version (`version=` on the task routes, /v2/.../versions/{v})"
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    backend: Literal["embedded", "triton"]


class ErrorBody(BaseModel):
    code: str = Field(..., examples=["unsupported_image_format"])
    message: str = Field(..., examples=["image format TIFF is not accepted; use one of JPEG, PNG, WEBP"])


class ErrorResponse(BaseModel):
    error: ErrorBody
