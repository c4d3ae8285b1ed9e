"""UNet forward, Stable Diffusion v1.5 configuration (860 M parameters): batch 2 (classifier-free guidance),
64×64×4 latents, 77×768 context; ours against diffusers' UNet2DConditionModel with the same (random) weights.

    python benchmarks/unet.py [--dtype fp32 bf16 int8] [--repeats 3] [--compile] [--openvino] [--inductor]

Prints median seconds per forward, peer/ours ratios, peak memory and the max abs difference of the outputs; for
bf16 and int8 (ours with int8 linear layers, `--precision int8`; peers at bf16) after fp32, ours' relative error
against ours in fp32.
The batch is one latent under two conditions, as classifier-free guidance has it. Ours runs as `Pipeline` runs it
(`prepare_for_inference`).
`--openvino` adds our UNet on the OpenVINO backend (`--backend openvino`), on `--backend auto` (the default: after
the row before has converted the graph into the cache, eager or OpenVINO as measured faster in this run, any
figures an earlier run left dropped) and, as the peer, diffusers' UNet converted by `openvino.convert_model`,
compiled for the CPU at the inference precision of --dtype.
`--inductor` adds our UNet on the Inductor backend (`--backend inductor`: compiled ahead of time with freezing, the
package read from its cache or compiled into it before the timing, as a later process finds it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (DTYPES, alternate, arguments, at_dtype, inductor_freezing, machine, measure_peak,  # noqa: E402
                     peaks, table, write_json)

from latent_diffusion.config import UNetConfig  # noqa: E402
from latent_diffusion.formats.diffusers_config import unet_config_to_diffusers  # noqa: E402
from latent_diffusion.formats.keymaps import unet_state_to_diffusers  # noqa: E402
from latent_diffusion.inference.int8 import int8_mode  # noqa: E402
from latent_diffusion.inference.precision import math_precision  # noqa: E402
from latent_diffusion.runtime import PRECISIONS  # noqa: E402
from latent_diffusion.unet import UNetModel  # noqa: E402

IMPLS = ("ours", "diffusers")
OPENVINO = ("ours + openvino", "ours, auto", "openvino")  # --openvino: our backends, and the peer (diffusers' in OpenVINO)
INDUCTOR = ("ours + inductor",)  # --inductor: our UNet compiled ahead of time (`--backend inductor`)


def random_unet(cfg: UNetConfig) -> UNetModel:
    """Our UNet with seeded random weights, the zero-initialised output layers drawn too (else it outputs 0)."""
    torch.manual_seed(0)
    ours = UNetModel(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return ours


def as_impl(impl: str, cfg: UNetConfig, ours: UNetModel, sample_size: int) -> torch.nn.Module:
    """`ours` itself, or diffusers' UNet2DConditionModel holding its weights (moved by our converter)."""
    if impl.startswith("ours"):
        return ours
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg, sample_size))
    model.load_state_dict(unet_state_to_diffusers(cfg, ours.state_dict()))
    return model


def inputs(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 2 of 64×64×4 latents (one latent twice, as guidance has it), timesteps and 77×768 contexts (seeded)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 64, 64, generator=gen).repeat(2, 1, 1, 1).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    return x, torch.tensor([500, 500], device=device), context


class _SampleOnly(torch.nn.Module):
    """diffusers' UNet as a plain tensor function (what a graph converter traces)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


def build_openvino(impl: str, name: str):
    """(runner, call) through OpenVINO at the inference precision of --dtype `name`: our UNet as `--backend
    openvino` runs it ("ours + openvino": prepared as `Pipeline` prepares it, converted with its weights as stored,
    the graph kept in the cache), as `--backend auto` does ("ours, auto": eager or that graph, whichever it measures
    faster; it reads the graph the row before wrote), or diffusers' UNet with the same weights converted in fp32,
    as OpenVINO's own examples do ("openvino", the peer)."""
    from latent_diffusion.inference.auto import AutoUNet
    from latent_diffusion.inference.openvino import OpenVINOUNet, default_cache_dir, signature_of
    cfg, hint = UNetConfig(), {"fp32": "fp32", "bf16": "bf16"}[name]
    module = random_unet(cfg)
    if impl == "openvino":
        runner = OpenVINOUNet(_SampleOnly(as_impl("diffusers", cfg, module, 64)), hint)
    else:
        module, _, region = at_dtype(module, True, DTYPES[name], "cpu")
        math = PRECISIONS[math_precision(name, torch.device("cpu"))]
        runner = OpenVINOUNet(module, hint, default_cache_dir(), math)
        if impl == "ours, auto":
            openvino = runner

            def eager(x, t, **kwargs):
                with region():
                    return module(x, t, **kwargs).float()

            runner = AutoUNet(eager, openvino, hint)
    x, t, context = inputs("cpu", torch.float32)

    @torch.inference_mode()
    def call():
        return runner(x, t, context=context)

    if impl == "ours, auto":  # the user's one conversion (`--backend openvino`) where the cache lacks it, then
        if not runner.openvino.ready(x, t, context=context):  # auto's measuring calls on each backend
            runner.openvino(x, t, context=context)
            runner.openvino = OpenVINOUNet(module, hint, default_cache_dir(), math)  # as a new process finds it
        # figures an earlier run left (another version of this code) go: auto measures both in this run
        (runner.openvino._entry(signature_of(x, t, {"context": context})) / "seconds.json").unlink(missing_ok=True)
        for _ in range(2 * (1 + AutoUNet.MEASURED)):
            call()
        print(f"ours, auto: seconds per call measured {runner.openvino.seconds(x, t, context=context)}")
    return runner, call


def build_inductor(name: str, device: str):
    """(runner, call): our UNet as `--backend inductor` runs it, prepared as `Pipeline` prepares it, its package
    read from the cache (`compiled.default_cache_dir`) or compiled into it on the first call."""
    from latent_diffusion.inference.compiled import default_cache_dir
    from latent_diffusion.inference.inductor import InductorUNet
    module, input_dtype, _ = at_dtype(random_unet(UNetConfig()), True, DTYPES[name], device)
    runner = InductorUNet(module, name, default_cache_dir("inductor"))
    x, t, context = inputs(device, input_dtype)

    @torch.inference_mode()
    def call():
        return runner(x, t, context=context)

    return runner, call


def build(impl: str, name: str, device: str, compile_: bool = False):
    """(module, call) for one implementation at --dtype `name`, weights from the same seeded random init of ours."""
    dtype = DTYPES[name]
    if impl in OPENVINO:
        return build_openvino(impl, name)
    if impl in INDUCTOR:
        return build_inductor(name, device)
    cfg = UNetConfig()
    model = as_impl(impl, cfg, random_unet(cfg), 64).to(device).eval()
    ours = impl.startswith("ours") and not compile_
    int8 = {"int8": int8_mode(torch.device(device))} if name == "int8" and ours else {}
    # compiled: a plain cast (Inductor does not trace the shipped path's weight-casting hooks)
    model, input_dtype, region = at_dtype(model, ours, dtype, device, **int8)
    x, t, context = inputs(device, input_dtype)
    fn = torch.compile(model) if compile_ else model

    @torch.inference_mode()
    def call():
        with region():
            out = fn(x, t, context) if impl.startswith("ours") else fn(x, t, encoder_hidden_states=context).sample
        return out.float()

    return model, call


def main() -> None:
    def extra(p):
        p.add_argument("--compile", action="store_true",
                       help="also time torch.compile of each (Inductor, with freezing: weights prepacked)")
        p.add_argument("--openvino", action="store_true",
                       help="also time our UNet on the OpenVINO backend and diffusers' UNet under OpenVINO")
        p.add_argument("--inductor", action="store_true",
                       help="also time our UNet on the Inductor backend (compiled ahead of time, kept in its cache)")
        p.add_argument("--skip", nargs="+", default=[], choices=IMPLS[1:] + OPENVINO,
                       help="leave these out (four SD UNets and two OpenVINO copies do not fit in 24 GB)")

    args = arguments(__doc__, extra, int8=True)
    if args.compile:
        inductor_freezing()
    if args.peak:
        _, call = build(args.impl, args.dtype[0], args.device)
        if args.impl in OPENVINO + INDUCTOR:
            call()  # converts and compiles: a one-off, like building the model, not part of the peak
        measure_peak(call)
        return
    print(f"UNet forward, SD 1.5, batch 2, 64×64 latents — {machine()}")
    figures, reference = {}, None
    for name in args.dtype:
        compiled = (OPENVINO if args.openvino else ()) + (INDUCTOR if args.inductor else ())
        compiled = compiled if name != "int8" else ()  # int8 runs on PyTorch only
        impls = tuple(i for i in IMPLS + compiled if i not in args.skip)
        peak = peaks(args, __file__, impls, "--dtype", name)  # first, while this process holds no model
        calls = {}
        for impl in impls:
            calls[impl] = build(impl, name, args.device)[1]
            if args.compile and impl not in OPENVINO + INDUCTOR:
                calls[f"{impl} + torch.compile"] = build(impl, name, args.device, compile_=True)[1]
        outputs = {impl: fn() for impl, fn in calls.items()}
        times = alternate(calls, args.repeats, warmup=0)  # the outputs above were the warm-up
        rows = table(f"UNet forward {name}", times, peak)
        diffs = {impl: (outputs["ours"] - out).abs().max().item() for impl, out in outputs.items() if impl != "ours"}
        print("\nmax |ours − peer|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
              + f" (output std {outputs['ours'].std().item():.3f})")
        reference = outputs["ours"] if name == "fp32" else reference
        relative = None
        if reference is not None and name != "fp32":  # the quality of reduced precision: against ours in fp32
            relative = ((outputs["ours"] - reference).norm() / reference.norm()).item()
            print(f"ours at {name} against ours at fp32: relative error {relative:.2e}")
        figures[name] = {"rows": rows, "max_abs_diff": diffs.get("diffusers"), "max_abs_diff_by_peer": diffs,
                         "relative_error_to_fp32": relative}
        del calls, outputs
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
