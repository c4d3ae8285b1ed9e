"""The Inductor backend (`--backend inductor`): the UNet compiled ahead of time by AOTInductor draws the images
PyTorch draws; the package is kept in the cache and read back by a later process without compiling; `auto`
measures it against PyTorch (and OpenVINO) and keeps the fastest; bad requests are clear errors.

Compiling and running packages happen in `ldm generate` processes, as a user runs them (one compile for the
module, about a minute on 2 cores), not in the test process: a CI run of an earlier form of these tests, which
loaded packages in the test process, saw that process die of a segmentation fault later, in a test that forks
DataLoader workers (not reproduced in four runs since); here the test process never loads one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.inference import check_backend
from latent_diffusion.inference.compiled import arguments
from latent_diffusion.inference.inductor import InductorUNet
from latent_diffusion.pipeline import Pipeline

PROMPT = "a red circle"
COMPILING = "compiling the UNet for Inductor"


def generate(folder, out, backend, steps=3, **env):
    """`ldm generate` in its own process, as a user runs it, with these caches (`env`); its log."""
    argv = [sys.executable, "-m", "latent_diffusion.cli", "generate", PROMPT, "--model", str(folder), "--steps",
            str(steps), "--seed", "0", "--num-images", "2", "--sampler", "dpmpp_2m", "--backend", backend,
            "--output", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def first_unet_call(folder, monkeypatch):
    """(pipeline of the model in `folder`, the (x, t, kwargs) of its first UNet call as `generate` makes it: the
    call the package was compiled for)."""
    pipe = Pipeline.from_pretrained(folder, device="cpu", backend="torch")
    recorded = []
    monkeypatch.setattr(pipe, "network", lambda x, t, **kw: recorded.append((x, t, kw)) or torch.zeros_like(x))
    pipe.generate_tensors(PROMPT, steps=1, num_images=2, seed=0, progress=False)
    return pipe, recorded[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, shapes_folder, autoencoder_run):
    """(model folder, caches, work folder, the log of the run that compiled the package)."""
    from latent_diffusion.training.ldm import train_ldm

    from conftest import tiny_ldm_config
    folder, work = tmp_path_factory.mktemp("ldm"), tmp_path_factory.mktemp("work")
    caches = {"LDM_INDUCTOR_CACHE": str(tmp_path_factory.mktemp("inductor")),
              "LDM_OPENVINO_CACHE": str(tmp_path_factory.mktemp("openvino"))}
    train_ldm(tiny_ldm_config(autoencoder_run, max_steps=2, checkpoint_every=2), shapes_folder, folder,
              device="cpu", progress=False)
    log = generate(folder, work / "inductor.png", "inductor", **caches)
    return folder, caches, work, log


def test_the_package_draws_what_pytorch_draws_and_is_kept(compiled):
    folder, caches, work, log = compiled
    generate(folder, work / "torch.png", "torch", **caches)
    for index in ("", "-1"):
        ours, torch_ = pixels(work / f"inductor{index}.png"), pixels(work / f"torch{index}.png")
        assert np.abs(ours - torch_).max() <= 2 and ours.std() > 5  # the same picture, and not a blank one
    cache = Path(caches["LDM_INDUCTOR_CACHE"])
    assert COMPILING in log and len(list(cache.glob("*/unet.pt2"))) == 1  # one signature: (x, t, context)
    assert not list(cache.glob(".*"))  # no half-written entry left


def test_a_later_process_reads_the_package_without_compiling(compiled):
    folder, caches, work, _ = compiled
    (package,) = Path(caches["LDM_INDUCTOR_CACHE"]).glob("*/unet.pt2")
    written = package.stat().st_mtime_ns
    log = generate(folder, work / "again.png", "inductor", **caches)
    assert COMPILING not in log and package.stat().st_mtime_ns == written
    assert np.array_equal(pixels(work / "again.png"), pixels(work / "inductor.png"))


def test_the_cache_is_keyed_by_the_weights_and_the_signature(compiled, monkeypatch):
    """`ready` (what auto asks) finds the entry for these weights and this signature only (no compiling here)."""
    folder, caches, _, _ = compiled
    pipe, (x, t, kwargs) = first_unet_call(folder, monkeypatch)
    unet = InductorUNet(pipe.unet, "fp32", caches["LDM_INDUCTOR_CACHE"])
    assert unet.ready(x, t, **kwargs)
    assert not unet.ready(x[:2], t[:2], **{k: v[:2] for k, v in kwargs.items()})  # another signature
    with torch.no_grad():
        pipe.unet.out[2].bias.add_(1.0)
    assert not InductorUNet(pipe.unet, "fp32", caches["LDM_INDUCTOR_CACHE"]).ready(x, t, **kwargs)  # other weights


ALIGNED = """
import sys, torch
from torch._inductor import aoti_load_package
from latent_diffusion.inference.inductor import CpuPackage
package, tensors = sys.argv[1], list(torch.load(sys.argv[2], weights_only=True))
ours = CpuPackage(package)
active = ours.runner.extract_constants_map(False)
strided = [t for t in active.values() if t.layout == torch.strided and t.numel()]
assert strided and all(t.data_ptr() % 64 == 0 for t in strided), [t.data_ptr() % 64 for t in strided]
with torch.no_grad():
    assert torch.equal(ours(tensors), aoti_load_package(package)(*tensors))
print("aligned", len(active), "constants")
"""


def test_the_package_runs_with_its_weights_aligned_to_cache_lines(compiled, tmp_path, monkeypatch):
    """On a CPU the package's weights are moved to memory aligned to 64 bytes (AOTInductor's runtime leaves them
    16 bytes past a cache line, which cost SD 1.5 20 %), and the output is unchanged: bit for bit what PyTorch's
    own loader gives, in a process of its own."""
    folder, caches, _, _ = compiled
    _, (x, t, kwargs) = first_unet_call(folder, monkeypatch)
    torch.save(tuple(arguments(torch.randn_like(x), t, kwargs)[2]), tmp_path / "tensors.pt")
    (package,) = Path(caches["LDM_INDUCTOR_CACHE"]).glob("*/unet.pt2")
    done = subprocess.run([sys.executable, "-c", ALIGNED, str(package), str(tmp_path / "tensors.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "aligned" in done.stdout, done.stderr


def test_auto_measures_inductor_against_pytorch_then_decides_at_once(compiled):
    """With the package in the cache, auto runs three calls on each (the first of each warms up), then the faster;
    the figures go beside the package, and a later process decides from them at once."""
    folder, caches, work, _ = compiled
    only_inductor = {**caches, "LDM_OPENVINO_CACHE": str(work / "no-openvino")}
    (entry,) = Path(caches["LDM_INDUCTOR_CACHE"]).glob("*/unet.pt2")
    figures = entry.parent / "seconds.json"
    figures.unlink(missing_ok=True)  # an earlier test's: measured afresh here
    log = generate(folder, work / "auto.png", "auto", steps=7, **only_inductor)  # 7 UNet calls (∅ and prompt batched)
    assert "backend auto: the UNet on" in log and COMPILING not in log
    record = json.loads(figures.read_text())
    assert set(record["seconds"]) == {"torch-fp32", "inductor-fp32"} and "inductor aoti" in record["software"]
    figures.write_text(json.dumps({**record, "seconds": {"torch-fp32": 1.0, "inductor-fp32": 0.01}}))
    log = generate(folder, work / "later.png", "auto", steps=2, **only_inductor)
    assert "backend auto: the UNet on Inductor (seconds per call as measured here: PyTorch 1.00, Inductor 0.01)" in log


def test_auto_measures_every_compiled_backend_with_a_graph(compiled):
    """With graphs in both caches, auto measures PyTorch, OpenVINO and Inductor in one process and runs the
    fastest; each entry keeps the same three figures, so a later process measures nothing."""
    pytest.importorskip("openvino")
    folder, caches, work, _ = compiled
    generate(folder, work / "openvino.png", "openvino", steps=1, **caches)
    log = generate(folder, work / "three.png", "auto", steps=10, **caches)  # three calls each, then the fastest
    records = [json.loads(path.read_text())["seconds"] for cache in caches.values()
               for path in Path(cache).glob("*/seconds.json")]
    assert len(records) == 2 and records[0] == records[1]
    assert set(records[0]) == {"torch-fp32", "openvino-fp32", "inductor-fp32"}
    fastest = min(("PyTorch", "torch"), ("OpenVINO", "openvino"), ("Inductor", "inductor"),
                  key=lambda names: records[0][f"{names[1]}-fp32"])[0]
    assert f"backend auto: the UNet on {fastest} (" in log


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


def test_a_controlnet_asks_for_backend_torch(compiled):
    """A compiled graph takes tensors: residuals from a ControlNet are a clear error, before any compiling."""
    from latent_diffusion.unet import Residuals

    pipe = Pipeline.from_pretrained(compiled[0], device="cpu", backend="inductor")
    x, t = torch.zeros(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="backend 'inductor' runs a UNet compiled for tensor inputs; a ControlNet's"):
        pipe.network(x, t, context=torch.zeros(1, 3, 384), residuals=Residuals(skips=[]))
