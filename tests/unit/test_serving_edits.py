"""The MLflow model from images: img2img, inpainting (known pixels kept exactly), outpainting, a mask
with nothing to repaint, each row seeded by its index, bytes, arrays and base64 alike, one-line
errors naming the column or param, and a logged and loaded model (and its REST parsing) on PNG bytes."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imager.diffusion import ScheduleConfig
from imager.errors import ConfigError
from imager.inference import Cascade, CascadeSampling, SRSampling, StageSampling, encode_prompts
from imager.inference.edit import prepare, to_tensor
from imager.inference.images import resize, resize_mask, to_hwc
from imager.models import save_model
from imager.serving import CascadeModel, log_cascade
from tests.unit.test_inference import HashEncoder, sr_stage, stage

SAMPLING = CascadeSampling(sampler="ddim", base=StageSampling(steps=3, guidance=3.0), sr=SRSampling(steps=2), batch_size=4)
SIZE = 16  # the tiny cascade's output: 8 px base, 16 px SR


def picture(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def hole(h: int = 32, w: int = 32) -> np.ndarray:
    """A gray mask: the middle quarter white (repaint), the rest black (keep)."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return mask


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def frame(prompts, images=None, masks=None, **columns) -> pd.DataFrame:
    data = {"prompt": list(prompts), **columns}
    for name, cells in (("image", images), ("mask", masks)):
        if cells is not None:
            data[name] = pd.Series(list(cells), dtype=object)
    return pd.DataFrame(data)


def known_pixels(image: np.ndarray, mask: np.ndarray | None = None, *, outpaint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the input at the output's size as uint8 (H, W, 3), where it is kept (H, W) bool), computed as
    the cascade resizes its inputs."""
    edit = prepare(image, mask, outpaint_pad=outpaint)
    expected = to_hwc(resize(edit.image, SIZE))[0].numpy()
    keep = (resize_mask(edit.mask, SIZE)[0, 0] == 0).numpy()
    return expected, keep


@pytest.fixture(scope="module")
def model() -> CascadeModel:
    m = CascadeModel()
    m.cascade, m.encoder, m.sampling = Cascade(stage(), sr_stage()), HashEncoder(), SAMPLING
    return m


def test_img2img_differs_from_the_text_result_and_is_deterministic(model, one_thread):
    text = model.predict(None, ["red apple"])
    edit = frame(["red apple"], [png(picture(0))])
    a = model.predict(None, edit, params={"strength": 0.5})
    assert a.shape == (1, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, model.predict(None, edit, params={"strength": 0.5}))
    assert not np.array_equal(a, text)
    assert not np.array_equal(a, model.predict(None, frame(["red apple"], [png(picture(1))]), params={"strength": 0.5}))
    refined = model.predict(None, edit, params={"sr_strength": 0.5})  # the SR stage refines the given image
    assert not np.array_equal(refined, text) and not np.array_equal(refined, a)


def test_strength_1_without_a_mask_is_the_text_result(model, one_thread, caplog):
    with caplog.at_level(logging.WARNING, logger="imager"):
        got = model.predict(None, frame(["red apple"], [png(picture(0))]))
    assert np.array_equal(got, model.predict(None, ["red apple"]))
    assert "image (row 1): not used at strength 1 without a mask" in caplog.text


def test_inpainting_keeps_the_known_pixels_exactly(model, one_thread):
    image, mask = picture(0), hole()
    expected, keep = known_pixels(image, mask)
    assert keep.any() and not keep.all()
    for params in ({}, {"resample": 2}):
        [got] = model.predict(None, frame(["red apple"], [png(image)], [png(mask)]), params=params)
        assert np.array_equal(got[keep], expected[keep])
        assert not np.array_equal(got[~keep], expected[~keep])  # the hole is repainted
    resampled = model.predict(None, frame(["red apple"], [png(image)], [png(mask)]), params={"resample": 2})
    assert not np.array_equal(resampled, model.predict(None, frame(["red apple"], [png(image)], [png(mask)])))


def test_outpainting_keeps_the_image_and_paints_the_border(model, one_thread, caplog):
    image = picture(2, h=24, w=32)
    expected, keep = known_pixels(image, outpaint="top=8")  # 32 x 32 canvas, the top quarter new
    assert keep.any() and not keep.all()
    with caplog.at_level(logging.WARNING, logger="imager"):
        [got] = model.predict(None, frame(["red apple"], [png(image)]), params={"outpaint": "top=8"})
    assert np.array_equal(got[keep], expected[keep]) and not np.array_equal(got[~keep], expected[~keep])
    assert "not used at strength 1" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="imager"):
        cropped = model.predict(None, frame(["red apple"], [png(image)], [png(hole(24, 32))]))
    assert "image (row 1): 32x24 is not square; centre-cropped" in caplog.text
    assert not np.array_equal(cropped[0], got)


def test_a_mask_with_no_white_returns_the_input(model, caplog):
    image = picture(3)
    with caplog.at_level(logging.WARNING, logger="imager"):
        [got] = model.predict(None, frame(["red apple"], [png(image)], [np.zeros((32, 32), np.uint8)]))
    assert np.array_equal(got, to_hwc(resize(to_tensor(Image.fromarray(image)), SIZE))[0].numpy())
    assert "mask (row 1): has no white, so nothing is repainted" in caplog.text


def test_bytes_arrays_and_base64_give_the_same_result(model, one_thread):
    image, mask = picture(4), hole()
    rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    results = [
        model.predict(None, frame(["red apple"], [img], [m]))
        for img, m in (
            (png(image), png(mask)),
            (image, mask),
            (rgba, np.repeat(mask[..., None], 3, axis=-1)),
            (base64.encodebytes(png(image)).decode(), base64.b64encode(png(mask)).decode()),
        )
    ]
    assert all(np.array_equal(r, results[0]) for r in results[1:])
    assert not np.array_equal(results[0], model.predict(None, frame(["red apple"], [png(image)], [png(255 - mask)])))


def test_rows_are_seeded_by_their_index_and_text_rows_as_without_images(model, one_thread):
    a, b, mask = png(picture(5)), png(picture(6)), png(hole())
    prompts = ["red apple", "blue car", "green tree"]
    mixed = model.predict(None, frame(prompts, [a, None, b], [mask, None, mask]))
    text = model.predict(None, prompts)
    assert np.array_equal(mixed[1], text[1])  # batched with rows 0 and 2 as without images
    assert np.array_equal(mixed[0], model.predict(None, frame(prompts[:1], [a], [mask]))[0])
    assert np.array_equal(mixed[2], model.predict(None, frame(prompts[2:], [b], [mask]), params={"seed": 2})[0])
    assert not np.array_equal(mixed[2], model.predict(None, frame(prompts[2:], [b], [mask]))[0])  # seed 0 is another image
    assert not np.array_equal(mixed[0], text[0]) and not np.array_equal(mixed[2], text[2])
    # Several rows with images in one batch: each still alone (batch_size does not change them).
    two = model.predict(None, frame(prompts[:2], [a, b], [mask, mask]), params={"batch_size": 1})
    assert np.array_equal(two, model.predict(None, frame(prompts[:2], [a, b], [mask, mask])))


def test_a_call_without_images_is_sampled_as_the_cascade_samples_it(model, one_thread):
    prompts = ["red apple", "blue car", "green tree"]
    cond, _ = encode_prompts(model.encoder, prompts)
    _, sr = model.cascade.generate(cond, SAMPLING.model_copy(update={"batch_size": 2}))
    got = model.predict(None, pd.DataFrame({"prompt": prompts}), params={"batch_size": 2})
    assert np.array_equal(got, to_hwc(sr).numpy())
    assert np.array_equal(got, model.predict(None, frame(prompts, [None] * 3, [None] * 3), params={"batch_size": 2}))


GOOD, MASK = png(picture(0)), png(hole())
BAD_INPUTS = [
    (frame(["a", "b"], [GOOD, b"not a png"]), {}, r"^image \(row 2\): bytes is not an image Pillow can read$"),
    (frame(["a"], [5]), {}, r"^image \(row 1\): expected PNG/JPEG bytes or a uint8 array"),
    (frame(["a"], ["/etc/hostname"]), {}, r"^image \(row 1\): a string must be base64-encoded PNG/JPEG bytes"),
    (frame(["a"], [np.zeros((8, 8, 2), np.uint8)]), {}, r"^image \(row 1\): an array must be \(H, W\), \(H, W, 3\) or \(H, W, 4\)"),
    (frame(["a"], [GOOD], [np.zeros((8, 16), np.uint8)]), {}, r"^mask \(row 1\): 16x8 has another shape than the image \(32x32\)"),
    (frame(["a", "b"], [GOOD, None], [None, MASK]), {}, r"^mask \(row 2\): a mask needs an image in the image column"),
    (frame(["a"], [GOOD]), {"strength": 0.0}, r"^params: strength: input should be greater than 0"),
    (frame(["a"], [GOOD]), {"strength": 1.5}, r"^params: strength: input should be less than or equal to 1"),
    (["a"], {"strength": 0.5}, r"^params: strength: 0.5 redraws part of an input image, but row 1 has none"),
    (frame(["a", "b"], [GOOD, None]), {"sr_strength": 0.5}, r"^params: sr_strength: 0.5 .* but row 2 has none"),
    (frame(["a"], [GOOD], [MASK]), {"resample": 0}, r"^params: resample: input should be greater than or equal to 1"),
    (frame(["a"], [GOOD], [MASK]), {"mask_blur": -1.0}, r"^params: mask_blur: must be >= 0"),
    (frame(["a"], [GOOD]), {"outpaint": "left=x"}, r"^params: outpaint: left=x is not a whole number of pixels"),
    (["a"], {"outpaint": "16"}, r"^params: outpaint: no row has an image to extend"),
    (pd.DataFrame({"image": [GOOD]}), {}, r"^prompt: the DataFrame has no prompt column"),
    (frame(["a", " "], [GOOD, None]), {}, r"^prompt 2 is empty; give a text such as 'red apple', or an image to edit$"),
]


def test_an_edit_may_have_an_empty_prompt(model, one_thread):
    image, mask = picture(0), hole()
    expected, keep = known_pixels(image, mask)
    [got] = model.predict(None, frame([""], [png(image)], [png(mask)]))
    assert np.array_equal(got[keep], expected[keep])
    assert not np.array_equal(got, model.predict(None, frame(["red apple"], [png(image)], [png(mask)]))[0])  # no text, another image


@pytest.mark.parametrize(("model_input", "params", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_column_or_param_before_sampling(model, monkeypatch, model_input, params, message):
    def sampled(*args, **kwargs):
        raise AssertionError("sampled before the input was checked")

    monkeypatch.setattr(model.cascade, "generate", sampled)
    with pytest.raises(ConfigError, match=message) as err:
        model.predict(None, model_input, params=params)
    assert "\n" not in str(err.value)


def test_a_logged_and_loaded_model_takes_png_bytes(tmp_path, monkeypatch, mlflow_uri, one_thread):
    from mlflow.pyfunc.scoring_server import invocations

    paths = {}
    for name, s in (("base", stage()), ("sr", sr_stage())):
        meta = {"schedule": ScheduleConfig(name="cosine", timesteps=100).model_dump(), "prediction": s.prediction, "resolution": s.resolution}
        if s.lowres is not None:
            meta |= {"lowres": s.lowres, "aug_level": s.aug_level}
        save_model(s.model, paths.setdefault(name, tmp_path / f"{name}.safetensors"), extra=meta)
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())  # no real encoder to load
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code folder
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.create_experiment(f"serving-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_cascade(paths["base"], paths["sr"], embed={"encoder": "minilm", "max_length": 6}, sampling=SAMPLING, workdir=tmp_path / "work")
    loaded = mlflow.pyfunc.load_model(info.model_uri)

    direct = CascadeModel()
    direct.cascade, direct.encoder, direct.sampling = Cascade.load(paths["base"], paths["sr"]), HashEncoder(), SAMPLING
    image, mask = picture(7), hole()
    request = frame(["red apple", "blue car"], [png(image), None], [png(mask), None], negative_prompt=["green", None])
    got = loaded.predict(request, params={"resample": 2})
    assert got.shape == (2, SIZE, SIZE, 3) and got.dtype == np.uint8
    assert np.array_equal(got, direct.predict(None, request, params={"resample": 2}))
    expected, keep = known_pixels(image, mask)
    assert np.array_equal(got[0][keep], expected[keep])
    plain = loaded.predict(["red apple", "blue car"])
    assert np.array_equal(plain, direct.predict(None, ["red apple", "blue car"])) and not np.array_equal(plain[0], got[0])
    assert not np.array_equal(loaded.predict(frame(["red apple"], negative_prompt=["green"])), plain[:1])  # the column reaches predict
    with pytest.raises(ConfigError, match=r"^image \(row 1\): bytes is not an image"):
        loaded.predict(frame(["red apple"], [b"not a png"]))

    # MLflow's REST server: binary cells arrive as base64 text in dataframe_split JSON.
    encoded = request.map(lambda v: base64.encodebytes(v).decode() if isinstance(v, bytes) else v)
    body = json.dumps({"dataframe_split": encoded.to_dict(orient="split", index=False), "params": {"resample": 2}})
    response = invocations(body, "application/json", loaded, loaded.metadata.get_input_schema())
    assert response.status == 200, response.response
    served = np.asarray(json.loads(response.response)["predictions"], dtype=np.uint8)
    assert np.array_equal(served, got)
