"""The Inductor backend (`backend="inductor"`): the UNet compiled ahead of time by AOTInductor gives the PyTorch
outputs and a pipeline on it the same images; the package is kept in the cache and read back by a later process
without compiling; `auto` measures it against PyTorch; bad requests are clear errors. One compile for the module
(about a minute on 2 cores): the pipeline's."""

import json
import logging

import pytest
import torch

from latent_diffusion.inference import check_backend
from latent_diffusion.inference.inductor import InductorUNet
from latent_diffusion.pipeline import Pipeline

KWARGS = dict(steps=3, guidance_scale=3.0, sampler="dpmpp_2m", num_images=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, shapes_folder, autoencoder_run):
    """(model folder, cache folder, images on backend torch, images on backend inductor: compiled into the cache)."""
    from latent_diffusion.training.ldm import train_ldm

    from conftest import tiny_ldm_config
    folder, cache = tmp_path_factory.mktemp("ldm"), tmp_path_factory.mktemp("inductor-cache")
    train_ldm(tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2), shapes_folder, folder,
              device="cpu", progress=False)
    torch_images = Pipeline.from_pretrained(folder, device="cpu", backend="torch").generate_tensors("a", **KWARGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_INDUCTOR_CACHE", str(cache))
        pipe = Pipeline.from_pretrained(folder, device="cpu", backend="inductor")
        inductor_images = pipe.generate_tensors("a", **KWARGS)
    return folder, cache, torch_images, inductor_images


def test_pipeline_generates_the_same_images_on_inductor(compiled):
    _, cache, torch_images, inductor_images = compiled
    assert (inductor_images - torch_images).abs().max() < 1e-3
    assert len(list(cache.glob("*/unet.pt2"))) == 1  # one signature: (x, t, context)
    assert not list(cache.glob(".*"))  # no half-written entry left


def test_a_later_process_reads_the_package_without_compiling(compiled, monkeypatch):
    import torch._inductor

    folder, cache, torch_images, inductor_images = compiled
    monkeypatch.setenv("LDM_INDUCTOR_CACHE", str(cache))

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    pipe = Pipeline.from_pretrained(folder, device="cpu", backend="inductor")
    assert torch.equal(pipe.generate_tensors("a", **KWARGS), inductor_images)
    signature = next(iter(pipe.compiled_unet("inductor").compiled))
    x, t, kwargs = call_of(signature)
    assert not pipe.compiled_unet("inductor").ready(x[:1], t[:1], **{k: v[:1] for k, v in kwargs.items()})
    monkeypatch.undo()
    assert InductorUNet(pipe.unet, "fp32", cache).ready(x, t, **kwargs)  # a new object, as a new process: the entry
    bias = pipe.unet.out[2].bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1.0)
    assert not InductorUNet(pipe.unet, "fp32", cache).ready(x, t, **kwargs)  # other weights: another entry
    with torch.no_grad():
        bias.copy_(original)


def call_of(signature: tuple) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Arguments (x, t, named) of a call with this signature (zeros)."""
    names, specs = signature
    x, t, *rest = (torch.zeros(shape, dtype=dtype) for shape, dtype in specs)
    return x, t, dict(zip(names, rest))


def test_auto_measures_inductor_against_pytorch_and_keeps_the_figures(compiled, monkeypatch, caplog):
    """With the package in the cache, auto runs three calls on each (the first of each warms up), then the faster;
    the figures go beside the package, and a later process decides from them at once."""
    folder, cache, _, _ = compiled
    monkeypatch.setenv("LDM_INDUCTOR_CACHE", str(cache))
    auto = Pipeline.from_pretrained(folder, device="cpu")
    assert auto._compiled_may_run({"context": torch.zeros(1)}) == ("inductor",)
    images = auto.generate_tensors("a", **{**KWARGS, "steps": 7})  # 7 UNet calls (batch 4: ∅ and the prompt)
    steps = Pipeline.from_pretrained(folder, device="cpu", backend="torch").generate_tensors("a", **{**KWARGS,
                                                                                                  "steps": 7})
    assert (images - steps).abs().max() < 1e-3
    (signature,) = auto._auto.ready
    calls = {backend: auto._auto.calls[signature, backend] for backend in ("torch", "inductor")}
    assert sorted(calls.values()) == [3, 4]  # three each, then the faster
    record = json.loads(next(cache.glob("*/seconds.json")).read_text())
    assert set(record["seconds"]) == {"torch-fp32", "inductor-fp32"} and "inductor aoti" in record["software"]

    entry = next(cache.glob("*/seconds.json"))
    entry.write_text(json.dumps({**record, "seconds": {"torch-fp32": 1.0, "inductor-fp32": 0.01}}))
    later = Pipeline.from_pretrained(folder, device="cpu")
    with caplog.at_level(logging.INFO, logger="latent_diffusion.inference.auto"):
        later.generate_tensors("a", **KWARGS)
    assert set(later._auto.calls) == {(signature, "inductor") for signature in later._auto.ready}
    assert "backend auto: the UNet on Inductor (seconds per call as measured here: PyTorch 1.00, Inductor 0.01)" \
        in caplog.text


def test_inductor_errors_are_clear(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend 'inductor' runs fp32, bf16, fp16, not --precision int8"):
        check_backend("inductor", cpu, "int8")
    with pytest.raises(ValueError, match="on this CPU bf16 weights compute in fp32 .* use --precision fp32"):
        check_backend("inductor", cpu, "bf16", "fp32")
    check_backend("inductor", cpu, "bf16", "bf16")
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ValueError, match="finds no compiler 'no-such-compiler'"):
        check_backend("inductor", cpu, "fp32")
    unet = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"the Inductor backend computes at the dtype the weights are kept in "
                                         r"\(torch.bfloat16\), not torch.float32"):
        InductorUNet(unet, "bf16", dtype=torch.float32)


def test_auto_measures_every_compiled_backend_with_a_graph(compiled, monkeypatch, tmp_path):
    """With graphs in both caches, auto measures PyTorch, OpenVINO and Inductor in one process and runs the
    fastest; each entry keeps the three figures, so a later process measures nothing."""
    pytest.importorskip("openvino")
    folder, cache, _, _ = compiled
    monkeypatch.setenv("LDM_INDUCTOR_CACHE", str(cache))
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path))
    kwargs = {**KWARGS, "steps": 10}  # three calls each, then the fastest
    Pipeline.from_pretrained(folder, device="cpu", backend="openvino").generate_tensors("a", **{**KWARGS, "steps": 1})
    for entry in cache.glob("*/seconds.json"):
        entry.unlink()  # an earlier test's pair of figures: measured afresh here
    auto = Pipeline.from_pretrained(folder, device="cpu")
    auto.generate_tensors("a", **kwargs)
    (signature,) = auto._auto.ready
    assert auto._auto.ready[signature] == ("openvino", "inductor")
    calls = sorted(auto._auto.calls[signature, backend] for backend in ("torch", "openvino", "inductor"))
    assert calls == [3, 3, 4]
    records = [json.loads(entry.read_text())["seconds"] for entry in (*cache.glob("*/seconds.json"),
                                                                       *tmp_path.glob("*/seconds.json"))]
    assert len(records) == 2 and records[0] == records[1]
    assert set(records[0]) == {"torch-fp32", "openvino-fp32", "inductor-fp32"}
    later = Pipeline.from_pretrained(folder, device="cpu")
    later.generate_tensors("a", **{**KWARGS, "steps": 2})
    fastest = min(("torch", "openvino", "inductor"), key=lambda b: records[0][f"{b}-fp32"])
    assert set(later._auto.calls) == {(signature, fastest)}


def test_a_controlnet_asks_for_backend_torch(compiled):
    """A compiled graph takes tensors: residuals from a ControlNet are a clear error, before any compiling."""
    from latent_diffusion.unet import Residuals

    folder = compiled[0]
    pipe = Pipeline.from_pretrained(folder, device="cpu", backend="inductor")
    x, t = torch.zeros(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="backend 'inductor' runs a UNet compiled for tensor inputs; a ControlNet's"):
        pipe.network(x, t, context=torch.zeros(1, 3, 384), residuals=Residuals(skips=[]))
