"""JPEG decode and resize on the device (service/core/device_decode.py), run here on the CPU: the same
model input and geometry as the CPU path within its stated tolerance, the same errors, the same
EXIF turns, and every other image on the CPU path."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from export.repository import Batching, model_config
from export.spec import ModelSpec
from service.core.pipeline import TaskPipeline
from service.backends.base import Encoded
from service.core.device_decode import TOLERANCE, DevicePreparer, device_jpeg_orientation, plan_on_device
from service.imaging.images import ImageError, ImageTooLarge, UndecodableImage, UnsupportedImageFormat
from service.model_config import dump
from service.settings import Settings
from tasks import MODELS


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Contracts only (no model.pt): the classifier centre-crops at 64 from 73, the others letterbox to 64."""
    root = tmp_path_factory.mktemp("repository")
    labels = {"classifier": ("a", "b"), "detector": ("__background__", "a"), "segmenter": ("bg", "a")}
    for model in MODELS:
        spec = ModelSpec(
            model, nn.Identity(), labels[model], 64, "checkpoint:x", 73 if model == "classifier" else None
        )
        (root / model / "1").mkdir(parents=True)
        (root / model / "config.pbtxt").write_text(dump(model_config(spec, Batching(), cpu=False)))
        (root / model / "labels.txt").write_text("\n".join(spec.labels) + "\n")
    return root


def _scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients and a few sharp blocks: asymmetric, so any wrong turn shows."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        left, top = rng.integers(0, width - width // 4), rng.integers(0, height - height // 4)
        pixels[top : top + height // 5, left : left + width // 6] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


def _compare(pipeline: TaskPipeline, blobs: list[bytes]) -> DevicePreparer:
    preparer = DevicePreparer(pipeline, "cpu")
    batch, geometries = preparer.prepare(blobs)
    assert batch.dtype == torch.uint8 and batch.shape == (len(blobs), 3, 64, 64)
    for i, blob in enumerate(blobs):
        expected, geometry = pipeline.prepare(blob)
        for field in dataclasses.fields(geometry):
            assert getattr(geometries[i], field.name) == pytest.approx(
                getattr(geometry, field.name), rel=1e-6
            ), field
        diff = (batch[i].numpy().astype(np.int16) - expected.astype(np.int16)).__abs__()
        assert diff.mean() <= TOLERANCE.mean_abs and np.percentile(diff, 99) <= TOLERANCE.p99_abs, (
            i,
            diff.mean(),
        )
    return preparer


@pytest.mark.parametrize("model", MODELS)
def test_jpegs_match_the_cpu_path(repository: Path, model: str) -> None:
    pipeline = TaskPipeline.load(Settings(model_repository=repository), model)
    sizes = [(640, 480), (480, 640), (97, 61), (64, 64), (1600, 1200)]  # the last: Pillow decodes it reduced
    blobs = [_jpeg(_scene(w, h, seed)) for seed, (w, h) in enumerate(sizes)]
    blobs.append(_jpeg(_scene(200, 150).convert("L")))  # grayscale
    preparer = _compare(pipeline, blobs)
    assert (preparer.decoded_on_device, preparer.decoded_on_cpu) == (len(blobs), 0)


def test_exif_orientations_turn_as_pillow_turns_them(repository: Path) -> None:
    pipeline = TaskPipeline.load(Settings(model_repository=repository), "detector")
    image = _scene(120, 80)
    blobs = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        blobs.append(_jpeg(image, exif=exif.tobytes()))
        assert device_jpeg_orientation(blobs[-1], 10**9, ("JPEG",)) == orientation
    preparer = _compare(pipeline, blobs)
    assert preparer.decoded_on_device == 8


def test_other_images_take_the_cpu_path(repository: Path) -> None:
    pipeline = TaskPipeline.load(Settings(model_repository=repository), "segmenter")
    png, cmyk = io.BytesIO(), _jpeg(_scene(90, 70).convert("CMYK"))
    _scene(90, 70).save(png, format="PNG")
    preparer = _compare(pipeline, [png.getvalue(), cmyk, _jpeg(_scene(90, 70))])
    assert (preparer.decoded_on_device, preparer.decoded_on_cpu) == (1, 2)


def test_refusals_are_the_cpu_path_s(repository: Path) -> None:
    good = _jpeg(_scene(120, 90))
    settings = Settings(model_repository=repository, max_pixels=100 * 100, allowed_formats=("JPEG",))
    preparer = DevicePreparer(TaskPipeline.load(settings, "classifier"), "cpu")
    png = io.BytesIO()
    _scene(20, 20).save(png, format="PNG")
    small = _jpeg(_scene(60, 60))
    cases = [(small[: len(small) // 2], UndecodableImage), (good, ImageTooLarge), (png.getvalue(), UnsupportedImageFormat),
             (b"", UndecodableImage), (b"not an image", ImageError)]  # fmt: skip
    for blob, error in cases:
        with pytest.raises(error):
            preparer.prepare([_jpeg(_scene(50, 50)), blob])


def test_a_file_that_does_not_end_as_a_jpeg_takes_the_cpu_path(repository: Path) -> None:
    """Pillow refuses a truncated JPEG where a JPEG decoder may fill in the rest: no end-of-image marker,
    no device decode, so the client hears the CPU path's 400 whichever process decodes."""
    pipeline = TaskPipeline.load(Settings(model_repository=repository), "classifier")
    whole = _jpeg(_scene(90, 70))
    assert plan_on_device(pipeline, whole) is not None
    for blob in (whole[:-200], whole + b"trailer"):
        assert plan_on_device(pipeline, blob) is None
    with pytest.raises(UndecodableImage):
        pipeline.prepare(whole[:-200])


@pytest.mark.parametrize("model", MODELS)
def test_the_header_alone_gives_the_cpu_path_s_geometry(repository: Path, model: str) -> None:
    pipeline = TaskPipeline.load(Settings(model_repository=repository), model)
    for orientation, (width, height) in [(1, (640, 480)), (6, (640, 480)), (8, (97, 61)), (1, (1600, 1200))]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        blob = _jpeg(_scene(width, height), exif=exif.tobytes())
        encoded, geometry = plan_on_device(pipeline, blob)  # type: ignore[misc]
        assert encoded == Encoded(blob, orientation)
        expected = pipeline.prepare(blob)[1]
        for field in dataclasses.fields(geometry):
            assert getattr(geometry, field.name) == pytest.approx(getattr(expected, field.name), rel=1e-6), field


def test_each_image_of_a_batch_is_answered_or_refused_on_its_own(repository: Path) -> None:
    """The owner's side: a batch of JPEGs handed over undecoded; one the device rejects goes through the
    CPU path (a PNG here decodes there, garbage is refused with the CPU path's error), and the rest of the
    batch is not held up."""
    pipeline = TaskPipeline.load(Settings(model_repository=repository), "segmenter")
    preparer = DevicePreparer(pipeline, "cpu")
    png = io.BytesIO()
    _scene(90, 70).save(png, format="PNG")
    jpeg = _jpeg(_scene(120, 90))
    prepared = preparer.prepare_each([Encoded(jpeg, 1), Encoded(b"not an image", 1), Encoded(png.getvalue(), 1)])
    assert isinstance(prepared[1], ImageError)
    assert prepared[0].shape == prepared[2].shape == (3, 64, 64)
    np.testing.assert_array_equal(prepared[2].numpy(), pipeline.prepare(png.getvalue())[0])
    assert (preparer.decoded_on_device, preparer.decoded_on_cpu) == (1, 1)

    arrays = [pipeline.prepare(_jpeg(_scene(60, 80)))[0], pipeline.prepare(jpeg)[0]]
    kept, batch, refused = preparer.inputs([arrays[0], Encoded(b"\xff\xd8 broken", 1), Encoded(jpeg, 1), arrays[1]])
    assert kept == [0, 2, 3] and list(refused) == [1] and isinstance(refused[1], ImageError)
    assert batch is not None and batch.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(batch[0].numpy(), arrays[0])
    np.testing.assert_array_equal(batch[1].numpy(), prepared[0].numpy())
    kept, batch, refused = preparer.inputs([Encoded(b"junk", 1)])
    assert kept == [] and batch is None and isinstance(refused[0], ImageError)


@pytest.mark.parametrize("model", MODELS)
def test_images_of_one_size_are_prepared_together_as_each_alone(repository: Path, model: str) -> None:
    """The owner turns and resizes a batch's same-sized JPEGs as one tensor: the inputs are exactly those
    of one image at a time."""
    pipeline = TaskPipeline.load(Settings(model_repository=repository), model)
    preparer = DevicePreparer(pipeline, "cpu")
    images = [Encoded(_jpeg(_scene(160, 120, seed)), turn) for seed, turn in enumerate((1, 6, 1, 6, 3))]
    images.append(Encoded(_jpeg(_scene(97, 61)), 1))
    together = preparer.prepare_each(images)
    for image, prepared in zip(images, together, strict=True):
        (alone,) = preparer.prepare_each([image])
        assert torch.equal(prepared, alone)  # type: ignore[arg-type]
