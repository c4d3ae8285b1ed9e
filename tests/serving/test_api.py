"""`ldm serve`'s own API against the bundled model: images with their seeds and parameters (the same pixels as
A1111's route), progress and previews by task id, LoRAs by name, model names looked up never joined, every
validation error naming its field, the token and the page, capped bodies, images kept in --output-dir, and a
client that goes away having its job stopped."""

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import from_base64 as decode, png_base64 as png
from latent_diffusion.formats.lora import write_lora
from latent_diffusion.nn.lora import LowRankWeights

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from latent_diffusion.serving.app import create_app  # noqa: E402
from latent_diffusion.serving.models import Models  # noqa: E402

PROMPT = "a small green triangle in the center"


def test_generate_answers_images_with_seeds_and_parameters_as_the_a1111_route_draws_them(client):
    body = {"prompt": PROMPT, "steps": 3, "guidance": 5, "sampler": "Euler a", "seed": 21, "num_images": 2,
            "width": 64, "height": 48}
    reply = client.post("/api/v1/generate", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert [image["seed"] for image in data["images"]] == [21, 22]
    assert (data["model"], data["sampler"], data["steps"], data["guidance"]) == ("ldm-shapes", "euler_a", 3, 5.0)
    images = [decode(image["png"]) for image in data["images"]]
    assert all(image.size == (64, 48) for image in images)
    assert images[1].text["parameters"] == data["images"][1]["parameters"] and "Seed: 22" in images[1].text[
        "parameters"]
    theirs = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "cfg_scale": 5, "seed": 21,
                                                    "sampler_name": "Euler a", "batch_size": 2, "width": 64,
                                                    "height": 48}).json()
    assert all(np.array_equal(np.asarray(image), np.asarray(decode(other)))
               for image, other in zip(images, theirs["images"], strict=True))
    random_seed = client.post("/api/v1/generate", json={"prompt": PROMPT, "steps": 2}).json()
    assert 0 <= random_seed["images"][0]["seed"] < 2**32 and random_seed["width"] == 64  # the model's size


@pytest.mark.parametrize("body, field", [
    ({"steps": 0}, "steps"), ({"guidance": 500}, "guidance"), ({"num_images": 100}, "num_images"),
    ({"width": 100000}, "width"), ({"sampler": "LMS"}, "sampler"), ({"seed": -5}, "seed"),
    ({"width": 30}, "width"), ({"model": "../../etc/passwd"}, "model"), ({"loras": [{"name": "x"}]}, "loras"),
    ({"task_id": "a/b"}, "task_id"), ({"cfg_scale": 5}, "cfg_scale"), ({"mask": "AAAA"}, "mask"),
    ({"strength": 0.5}, "strength"), ({"image": "not base64!"}, "image"), ({"prompt": None}, "prompt"),
])
def test_bad_requests_are_422_naming_the_field(client, body, field):
    reply = client.post("/api/v1/generate", json={"prompt": PROMPT, "steps": 2, **body})
    assert reply.status_code == 422 and field in reply.text, reply.text


def test_img2img_and_inpainting_through_the_api(client):
    source = decode(client.post("/api/v1/generate", json={"prompt": PROMPT, "steps": 3, "seed": 1,
                                                           "width": 64, "height": 64}).json()["images"][0]["png"])
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    reply = client.post("/api/v1/generate", json={"prompt": "a large red circle in the center", "steps": 4,
                                                  "image": png(source), "mask": png(Image.fromarray(mask)),
                                                  "strength": 0.6, "seed": 2})
    assert reply.status_code == 200, reply.text
    filled = np.asarray(decode(reply.json()["images"][0]["png"]).convert("RGB"))
    assert np.array_equal(filled[mask == 0], np.asarray(source.convert("RGB"))[mask == 0])
    assert not np.array_equal(filled[mask > 0], np.asarray(source.convert("RGB"))[mask > 0])


def test_models_lists_what_the_server_offers(client):
    info = client.get("/api/v1/models").json()
    assert info["models"] == ["ldm-shapes"] and info["current"] == "ldm-shapes" and info["loaded"] == "ldm-shapes"
    assert "Euler a" in info["samplers"] and "DPM++ 2M" in info["samplers"] and info["loras"] == []
    schema = client.get("/openapi.json").json()
    assert {"/api/v1/generate", "/api/v1/progress", "/sdapi/v1/txt2img"} <= set(schema["paths"])


def test_a_models_dir_offers_only_models_and_switching_holds_one_at_a_time(bundled_pipe, tmp_path):
    from latent_diffusion.cli.common import bundled_model

    shipped = Path(bundled_model()).parent
    for name in ("ldm-fashion", "autoencoder-shapes-f4", "controlnet-shapes-mask.safetensors", "features-fashion"):
        (tmp_path / name).symlink_to(shipped / name)
    models = Models(bundled_model(), tmp_path)
    assert list(models.paths) == ["ldm-shapes", "ldm-fashion"]  # no autoencoder, ControlNet or features
    models._pipe, models._held = bundled_pipe, ("ldm-shapes", ())
    with TestClient(create_app(models)) as client:
        reply = client.post("/api/v1/generate", json={"prompt": "shirt", "model": "ldm-fashion", "steps": 2})
        assert reply.status_code == 200 and reply.json()["model"] == "ldm-fashion"
        assert models.held == ("ldm-fashion", ()) and models.loaded is not bundled_pipe
        assert client.get("/api/v1/models").json()["current"] == "ldm-shapes"  # a request's model is not sticky


def test_a_lora_applies_by_name_and_comes_off_for_the_next_request(client, models, bundled_pipe, tmp_path):
    layers, gen = {}, torch.Generator().manual_seed(0)
    for name, layer in bundled_pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k")):
            layers[f"unet.{name}"] = LowRankWeights(torch.randn(2, layer.in_features, generator=gen) * 0.5,
                                                    torch.randn(layer.out_features, 2, generator=gen) * 0.5, 2.0)
    (tmp_path / "loras").mkdir()
    write_lora(tmp_path / "loras" / "bold.safetensors", layers, bundled_pipe.config.unet)
    models.loras = Models(models.paths["ldm-shapes"], lora_dir=tmp_path / "loras").loras
    body = {"prompt": PROMPT, "steps": 3, "seed": 5}
    try:
        plain = client.post("/api/v1/generate", json=body).json()["images"][0]["png"]
        adapted = client.post("/api/v1/generate", json={**body, "loras": [{"name": "bold", "weight": 1.0}]})
        assert adapted.status_code == 200, adapted.text
        assert not np.array_equal(np.asarray(decode(plain)), np.asarray(decode(adapted.json()["images"][0]["png"])))
        assert client.get("/api/v1/models").json()["loras"] == ["bold"]
        again = client.post("/api/v1/generate", json=body).json()["images"][0]["png"]
        assert np.array_equal(np.asarray(decode(plain)), np.asarray(decode(again)))
        assert models.held == ("ldm-shapes", ())
    finally:
        models.loras = {}


def test_a_token_guards_every_route_but_the_page(models):
    with TestClient(create_app(models, token="s3cret")) as client:
        for path in ("/api/v1/models", "/openapi.json", "/docs", "/sdapi/v1/sd-models", "/api/v1/progress?task_id=a"):
            assert client.get(path).status_code == 401, path
        assert client.post("/api/v1/generate", json={"prompt": PROMPT}).status_code == 401
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and 'id="prompt"' in page.text
        assert client.get("/static/app.js").status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        for escape in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
            assert client.get(escape, headers=auth).status_code == 404, escape  # nothing outside static/


def test_a_body_over_the_cap_is_413(models):
    with TestClient(create_app(models, max_body=2**20)) as client:
        big = {"prompt": PROMPT, "image": "A" * (2**20 + 10)}
        reply = client.post("/api/v1/generate", json=big)
        assert reply.status_code == 413 and "1 MiB" in reply.text
        streamed = client.post("/api/v1/generate", content=(b"x" * 2**16 for _ in range(20)),
                               headers={"Content-Type": "application/json"})  # chunked: no Content-Length
        assert streamed.status_code == 413


def test_output_dir_keeps_every_image_with_its_parameters(models, tmp_path):
    with TestClient(create_app(models, output_dir=tmp_path / "out")) as client:
        client.post("/api/v1/generate", json={"prompt": PROMPT, "steps": 2, "seed": 3, "num_images": 2})
        client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 9})
    files = sorted(p.name for p in (tmp_path / "out").glob("*/*.png"))
    assert files == ["00000-3.png", "00001-4.png", "00002-9.png"]
    saved = Image.open(next((tmp_path / "out").glob("*/00002-9.png")))
    assert "Seed: 9" in saved.text["parameters"]


def test_progress_and_previews_by_task_id_while_a_job_runs(serve):
    url, app = serve(max_queue=4)
    release = threading.Event()
    app.state.worker.submit(lambda job: release.wait(10), task="blocker")  # holds the worker
    results = {}

    def post():
        results["reply"] = httpx.post(f"{url}/api/v1/generate", timeout=60,
                                      json={"prompt": PROMPT, "steps": 30, "seed": 4, "task_id": "mine"})

    thread = threading.Thread(target=post)
    thread.start()
    seen = []
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        progress = httpx.get(f"{url}/api/v1/progress", params={"task_id": "mine"}).json()
        seen.append(progress)
        if progress["state"] == "queued" and not release.is_set():
            assert progress["queue_position"] == 0
            release.set()
        time.sleep(0.02)
    thread.join(30)
    assert results["reply"].status_code == 200
    running = [p for p in seen if p["state"] == "running" and p["step"] > 0]
    assert running and any(p["state"] == "queued" for p in seen)
    steps = [p["step"] for p in running]
    assert steps == sorted(steps) and running[0]["steps"] == 30 and 0 < running[0]["fraction"] < 1
    preview = decode(running[-1]["preview"])
    assert preview.size == (64, 64)
    assert httpx.get(f"{url}/api/v1/progress", params={"task_id": "mine"}).json()["state"] == "unknown"
    a1111 = httpx.get(f"{url}/sdapi/v1/progress").json()
    assert a1111["current_image"] is None and a1111["progress"] == 0.0


def test_a_client_that_goes_away_has_its_job_stopped_and_the_server_serves_on(serve):
    url, app = serve(max_queue=4)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/api/v1/generate", timeout=1.0,
                   json={"prompt": PROMPT, "steps": 900, "task_id": "gone", "num_images": 4})
    deadline = time.monotonic() + 10
    while app.state.worker.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not app.state.worker.running  # stopped long before 1000 steps of 4 images
    reply = httpx.post(f"{url}/api/v1/generate", timeout=60, json={"prompt": PROMPT, "steps": 2})
    assert reply.status_code == 200


def test_interrupting_a_task_stops_it_at_a_step_with_409(serve):
    url, app = serve(max_queue=4)
    results = {}
    thread = threading.Thread(target=lambda: results.update(reply=httpx.post(
        f"{url}/api/v1/generate", timeout=60, json={"prompt": PROMPT, "steps": 900, "task_id": "long"})))
    thread.start()
    while httpx.get(f"{url}/api/v1/progress", params={"task_id": "long"}).json()["step"] < 1:
        time.sleep(0.02)
    assert httpx.post(f"{url}/api/v1/interrupt", params={"task_id": "long"}).json() == {"interrupted": True}
    thread.join(30)
    assert results["reply"].status_code == 409 and "interrupted" in json.loads(results["reply"].text)["detail"]
