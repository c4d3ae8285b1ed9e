"""The OpenVINO backend (`backend="openvino"`): the same UNet, compiled by OpenVINO, gives the PyTorch outputs,
and a pipeline on it generates the same images; bad requests are clear errors."""

import importlib.util
import json

import pytest
import torch

from latent_diffusion.pipeline import Pipeline
from latent_diffusion.config import UNetConfig
from latent_diffusion.unet import UNetModel

from conftest import randomised

openvino_missing = importlib.util.find_spec("openvino") is None
needs_openvino = pytest.mark.skipif(openvino_missing, reason="openvino is not installed (pip install openvino)")


def tiny_unet(**kw) -> UNetModel:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                     num_heads=2, context_dim=24, norm_groups=8, **kw)
    return randomised(UNetModel(cfg), 0)  # the zero-initialised output layers too, or everything is 0


@needs_openvino
def test_openvino_unet_matches_pytorch():
    from latent_diffusion.inference.openvino import OpenVINOUNet
    unet = tiny_unet()
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([10.0, 700.0])
    context, mask = torch.randn(2, 5, 24), torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        expected = unet(x, t, context=context, context_mask=mask)
    fp32 = OpenVINOUNet(unet, "fp32")
    got = fp32(x, t, context=context, context_mask=mask)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4
    assert len(fp32.compiled) == 1
    fp32(x, t, context=context, context_mask=mask)  # the same signature: compiled once
    no_mask = fp32(x, t, context=context, context_mask=None)  # a new signature: compiled again
    assert len(fp32.compiled) == 2 and (no_mask - unet(x, t, context=context).detach()).abs().max() < 1e-4
    bf16 = OpenVINOUNet(unet, "bf16")(x, t, context=context, context_mask=mask)
    assert (bf16 - expected).abs().max() < 0.05 * expected.abs().max()


@needs_openvino
def test_pipeline_generates_the_same_images_on_openvino(tmp_path, shapes_folder, autoencoder_run, monkeypatch):
    from latent_diffusion.training.ldm import train_ldm

    from conftest import tiny_ldm_config
    train_ldm(tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2), shapes_folder, tmp_path,
              device="cpu", progress=False)
    kwargs = dict(steps=3, guidance_scale=3.0, sampler="dpmpp_2m", num_images=2, seed=0, progress=False)
    torch_images = Pipeline.from_pretrained(tmp_path, device="cpu").generate_tensors("a red circle", **kwargs)
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.from_pretrained(tmp_path, device="cpu", backend="openvino")
    ov_images = pipe.generate_tensors("a red circle", **kwargs)
    assert (ov_images - torch_images).abs().max() < 1e-3
    assert len(list((tmp_path / "cache").glob("*/unet.xml"))) == 1  # one signature: (x, t, context)


@needs_openvino
def test_converted_graphs_are_cached_by_weights_and_signature(tmp_path, monkeypatch):
    import openvino

    from latent_diffusion.inference.openvino import OpenVINOUNet
    unet = tiny_unet()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    first = OpenVINOUNet(unet, "fp32", tmp_path)(x, t, context=context)
    assert len(list(tmp_path.glob("*/unet.xml"))) == 1 and not list(tmp_path.glob(".*"))  # no leftovers

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = OpenVINOUNet(unet, "fp32", tmp_path)(x, t, context=context)  # a new process would do the same
    assert torch.equal(again, first)
    monkeypatch.undo()
    with torch.no_grad():
        unet.out[2].bias.add_(1.0)  # other weights: another graph, with their own output
    changed = OpenVINOUNet(unet, "fp32", tmp_path)(x, t, context=context)
    assert len(list(tmp_path.glob("*/unet.xml"))) == 2 and (changed - first).abs().min() > 0.5
    expected = unet(x, t, context=context).detach()
    assert (changed - expected).abs().max() < 1e-4


def test_backend_errors_are_clear(tmp_path):
    from latent_diffusion.inference import check_backend
    with pytest.raises(ValueError, match="backend = 'tensorrt': expected one of auto, torch, openvino"):
        check_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_backend("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="runs fp32 or bf16, not --precision int8"):
        check_backend("openvino", torch.device("cpu"), "int8")
    check_backend("auto", torch.device("cuda"), "fp16")  # auto is PyTorch wherever OpenVINO cannot run
    if not openvino_missing:
        from latent_diffusion.inference.openvino import OpenVINOUNet
        with pytest.raises(ValueError, match="fp32 or bf16"):
            OpenVINOUNet(tiny_unet(), "fp16")


@needs_openvino
def test_bf16_weights_convert_as_stored():
    """A bf16 UNet converts with its bf16 weights (half the graph) and gives PyTorch's bf16 outputs."""
    import openvino

    from latent_diffusion.inference.compiled import Positional
    from latent_diffusion.inference.openvino import OpenVINOUNet
    unet = tiny_unet()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = unet(x, t, context=context)
    unet = unet.to(torch.bfloat16)
    compiled = OpenVINOUNet(unet, "bf16")
    assert compiled.dtype == torch.bfloat16 and next(unet.parameters()).dtype == torch.bfloat16  # not made fp32
    got = compiled(x, t, context=context)
    with torch.no_grad():
        eager = unet(x.bfloat16(), t, context=context.bfloat16()).float()
    rounding = (eager - expected).norm()  # what bf16 weights and math cost in PyTorch (1.6 % here)
    assert got.dtype == torch.float32 and (got - expected).norm() < 2 * rounding  # measured 1.4×
    graph = openvino.convert_model(Positional(unet, ("context",), torch.bfloat16), example_input=(x, t, context))
    constants = [op for op in graph.get_ops() if op.get_type_name() == "Constant"]
    assert sum(op.get_output_element_type(0) == openvino.Type.bf16 for op in constants) >= len(
        list(unet.parameters()))


@needs_openvino
def test_auto_backend_measures_both_then_runs_the_faster(tmp_path):
    """auto: PyTorch while no graph is cached; with one, three calls on each backend (the first of each warms up),
    then the faster by the figures, which later processes read from the cache: always a pair measured in one
    process."""
    from latent_diffusion.inference.auto import AutoUNet
    from latent_diffusion.inference.openvino import OpenVINOUNet
    unet = tiny_unet()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24)
    ran = []

    def eager(x, t, **kwargs):
        ran.append("torch")
        with torch.no_grad():
            return unet(x, t, **kwargs)

    auto = AutoUNet(eager, [OpenVINOUNet(unet, "fp32", tmp_path)], "fp32")
    for _ in range(3):
        auto(x, t, context=context)
    assert ran == ["torch"] * 3 and not auto.backends["openvino"].compiled  # nothing cached: never converted
    OpenVINOUNet(unet, "fp32", tmp_path)(x, t, context=context)  # the user converts once (--backend openvino)

    ran.clear()
    auto = AutoUNet(eager, [OpenVINOUNet(unet, "fp32", tmp_path)], "fp32")  # a new process
    outputs = [auto(x, t, context=context) for _ in range(6)]
    assert ran == ["torch"] * 3 and len(auto.backends["openvino"].compiled) == 1  # then three times on OpenVINO
    assert (outputs[5] - outputs[0]).abs().max() < 1e-4
    figures = auto.backends["openvino"].seconds(x, t, context=context)
    assert set(figures) == {"torch-fp32", "openvino-fp32"} and all(v > 0 for v in figures.values())
    faster = "openvino" if figures["openvino-fp32"] < figures["torch-fp32"] else "torch"
    before = len(ran)
    auto(x, t, context=context)
    assert len(ran) - before == (faster == "torch")

    entry = next(tmp_path.glob("*/seconds.json"))
    for faster in ("torch", "openvino"):  # a later process decides from the figures at once
        slower = "openvino" if faster == "torch" else "torch"
        record = json.loads(entry.read_text())
        entry.write_text(json.dumps({**record, "seconds": {f"{faster}-fp32": 0.01, f"{slower}-fp32": 1.0}}))
        ran.clear()
        auto = AutoUNet(eager, [OpenVINOUNet(unet, "fp32", tmp_path)], "fp32")
        for _ in range(3):
            auto(x, t, context=context)
        assert ran == (["torch"] * 3 if faster == "torch" else [])
        assert bool(auto.backends["openvino"].compiled) == (faster == "openvino")
    entry.write_text(json.dumps({**record, "software": "an older version"}))  # figures of other software: none
    assert OpenVINOUNet(unet, "fp32", tmp_path).seconds(x, t, context=context) == {}

    entry.write_text(json.dumps({**record, "seconds": {"torch-fp32": 1e-6}}))  # one figure: measured afresh
    auto = AutoUNet(eager, [OpenVINOUNet(unet, "fp32", tmp_path)], "fp32")
    for _ in range(6):
        auto(x, t, context=context)
    figures = json.loads(entry.read_text())["seconds"]
    assert set(figures) == {"torch-fp32", "openvino-fp32"} and figures["torch-fp32"] > 1e-6  # this process's pair


@needs_openvino
def test_auto_pipeline_runs_pytorch_for_what_openvino_cannot_take(tmp_path, shapes_folder, autoencoder_run,
                                                                 monkeypatch):
    """A pipeline on backend auto (the default) gives backend torch's images bit for bit where no graph is
    cached, and keeps to PyTorch for int8 and for LoRAs applied on the fly even where one is."""
    from latent_diffusion.training.ldm import train_ldm

    from conftest import tiny_ldm_config
    train_ldm(tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2), shapes_folder, tmp_path,
              device="cpu", progress=False)
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path / "cache"))
    kwargs = dict(steps=3, guidance_scale=3.0, num_images=1, seed=0, progress=False)
    torch_images = Pipeline.from_pretrained(tmp_path, device="cpu", backend="torch").generate_tensors("a", **kwargs)
    auto = Pipeline.from_pretrained(tmp_path, device="cpu")
    assert auto.backend == "auto" and torch.equal(auto.generate_tensors("a", **kwargs), torch_images)
    assert not auto.compiled_unet("openvino").compiled
    Pipeline.from_pretrained(tmp_path, device="cpu", backend="openvino").generate_tensors("a", **kwargs)
    assert auto._compiled_may_run({"context": torch.zeros(1)})
    assert not auto._compiled_may_run({"residuals": object()})  # a ControlNet's
    int8 = Pipeline.from_pretrained(tmp_path, device="cpu", precision="int8")
    assert not int8._compiled_may_run({"context": torch.zeros(1)})
