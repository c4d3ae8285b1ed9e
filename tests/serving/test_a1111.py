"""`ldm serve`'s AUTOMATIC1111 API against the bundled model: the response shape (base64 PNGs of the asked size with
their parameters, the seed of each image in `info`), the same image as `ldm generate` for the same seed, img2img and
inpainting, every validation error naming its field, the informational routes, the token; the worker's queue
bound, order and interrupts."""

import base64
import json
import threading

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.pipeline import Pipeline
from conftest import from_base64 as decode, png_base64 as png

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from latent_diffusion.serving.app import create_app  # noqa: E402

PROMPT = "a small green triangle in the center"


def test_txt2img_answers_as_a1111_and_draws_what_ldm_generate_draws(client, bundled_pipe, tmp_path, monkeypatch):
    body = {"prompt": PROMPT, "steps": 3, "cfg_scale": 5, "sampler_name": "Euler a", "seed": 11, "batch_size": 2,
            "n_iter": 2, "width": 64, "height": 64, "send_images": True, "styles": []}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11 and info["ignored_fields"] == ["send_images",
                                                                                                       "styles"]
    images = [decode(image) for image in data["images"]]
    assert len(images) == 4 and all(image.size == (64, 64) for image in images)
    assert images[2].text["parameters"] == info["infotexts"][2] and "Seed: 13" in info["infotexts"][2]
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: bundled_pipe))
    assert main(["generate", PROMPT, "--steps", "3", "--guidance", "5", "--sampler", "Euler a", "--seed", "13",
                 "-o", str(tmp_path / "cli.png")]) == 0
    cli = np.asarray(Image.open(tmp_path / "cli.png"), dtype=np.int16)
    assert np.abs(np.asarray(images[2], dtype=np.int16) - cli).max() <= 1  # drawn in a batch of 2 against alone
    assert info["model_defaults"] == [] and json.loads(client.post("/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 2}).json()["info"])["model_defaults"] == ["cfg_scale", "sampler_name", "width",
                                                                              "height"]
    alone = client.post("/sdapi/v1/txt2img", json={**body, "seed": 13, "batch_size": 1, "n_iter": 1}).json()
    assert np.array_equal(np.asarray(decode(alone["images"][0])), cli)


def test_img2img_and_inpainting_keep_what_they_should(client):
    reply = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 1})
    source = decode(reply.json()["images"][0])
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    body = {"prompt": "a large red circle in the center", "init_images": [png(source)], "steps": 4, "seed": 2,
            "denoising_strength": 0.6, "mask": png(Image.fromarray(mask))}
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    filled = np.asarray(decode(reply.json()["images"][0]).convert("RGB"))
    kept = np.asarray(source.convert("RGB"))[mask == 0]
    assert np.array_equal(filled[mask == 0], kept) and "Denoising strength: 0.6" in json.loads(
        reply.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("body, field", [
    ({"steps": 0}, "steps"), ({"cfg_scale": 500}, "cfg_scale"), ({"batch_size": 100}, "batch_size"),
    ({"width": 100000}, "width"), ({"sampler_name": "LMS"}, "sampler_name"), ({"seed": -5}, "seed"),
    ({"width": 30}, "width"), ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore_faces"),
])
def test_bad_requests_are_422_naming_the_field(client, body, field):
    reply = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, **body})
    assert reply.status_code == 422 and field in reply.text


def test_img2img_takes_the_size_of_its_image_rounded_to_the_model(client):
    odd = Image.new("RGB", (70, 50), (200, 30, 30))
    reply = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [png(odd)], "steps": 2})
    assert reply.status_code == 200, reply.text
    assert decode(reply.json()["images"][0]).size == (64, 48)


def test_bad_images_are_422(client):
    for init in ("not base64!", base64.b64encode(b"not an image").decode()):
        reply = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [init], "steps": 2})
        assert reply.status_code == 422 and "init_images" in reply.text


def test_the_informational_routes(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names and "DDIM" in names
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == ["ldm-shapes"]
    assert client.get("/sdapi/v1/options").json() == {"sd_model_checkpoint": "ldm-shapes"}
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ldm-shapes"}).status_code == 200
    reply = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert reply.status_code == 422 and "unknown model" in reply.text
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").status_code == 200


def test_a_token_guards_every_route(models):
    with TestClient(create_app(models, token="s3cret")) as client:
        assert client.get("/sdapi/v1/sd-models").status_code == 401
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_queue_is_429_with_retry_after_and_a_failing_job_500_while_serving_goes_on(models, monkeypatch):
    release = threading.Event()
    with TestClient(create_app(models, max_queue=1)) as client:
        worker = client.app.state.worker
        worker.submit(lambda job: release.wait(5))  # running
        worker.submit(lambda job: release.wait(5))  # waiting: the queue is full
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2})
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "5" and "--max-queue 1" in reply.text
        release.set()
        using = models.using
        monkeypatch.setattr(models, "using", lambda *a: (_ for _ in ()).throw(RuntimeError("disk\nfailed")))
        reply = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2})
        assert reply.status_code == 500 and reply.json()["detail"] == "RuntimeError: disk failed"
        monkeypatch.setattr(models, "using", using)
        assert client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_the_client_script_of_a1111s_api_documentation_runs_unchanged(serve, tmp_path):
    """The example of A1111's wiki page "API" (txt2img, then png-info for each image, saved with its info), with
    `requests`, against a real server."""
    import io

    import requests
    from PIL import PngImagePlugin

    url, _ = serve(max_queue=4)
    payload = {"prompt": "puppy dog", "steps": 5}
    response = requests.post(url=f'{url}/sdapi/v1/txt2img', json=payload)
    r = response.json()
    for i in r['images']:
        image = Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[0])))
        png_payload = {"image": "data:image/png;base64," + i}
        response2 = requests.post(url=f'{url}/sdapi/v1/png-info', json=png_payload)
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("parameters", response2.json().get("info"))
        image.save(tmp_path / 'output.png', pnginfo=pnginfo)
    saved = Image.open(tmp_path / "output.png")
    assert saved.size == (64, 64) and saved.text["parameters"].startswith("puppy dog\nSteps: 5")
    assert json.loads(r["info"])["infotexts"][0] == saved.text["parameters"]
    assert response2.json()["parameters"]["steps"] == 5
    bad = requests.post(url=f'{url}/sdapi/v1/png-info', json={"image": base64.b64encode(b"no").decode()})
    assert bad.status_code == 422 and "image" in bad.text
