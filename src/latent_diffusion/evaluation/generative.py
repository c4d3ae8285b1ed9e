"""Sample quality of a class- or caption-conditional model with a domain feature network: FID, KID, class
accuracy of conditional samples and within-class diversity, per guidance scale; JSON figures and a PNG plot."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latent_diffusion.data.fashion_mnist import caption_for
from latent_diffusion.evaluation.features import FeatureNet, extract
from latent_diffusion.evaluation.fid import fid, kid
from latent_diffusion.evaluation.inception import FIDInception, inception_features


def reference_images(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """(The first `limit`) real images of `dataset`, in [-1, 1]."""
    return torch.cat([batch["image"] for batch in DataLoader(dataset, batch_size=500)])[:limit]


def reference_features(model: FeatureNet, dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """Features of (the first `limit`) real images of `dataset`."""
    return extract(model, reference_images(dataset, limit))[0]


def class_prompts(pipe, labels: list[int]) -> list[str]:
    """What a model is asked for each label (`Conditioner.label_prompt`): the label number (class-conditional)
    or its caption, `a photo of a {class}`."""
    return [pipe.conditioner.label_prompt(label, caption_for(label)) for label in labels]


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance among samples of the same class, averaged over classes (diversity)."""
    spreads = [torch.pdist(features[labels == c].double()).mean() for c in labels.unique()
               if int((labels == c).sum()) > 1]
    return float(torch.stack(spreads).mean()) if spreads else float("nan")


@torch.no_grad()
def evaluate_samples(pipe, model: FeatureNet, reference: torch.Tensor, num_samples: int, sweep: list,
                     num_classes: int = 10, seed: int = 0, batch_size: int = 250, progress: bool = True,
                     inception: tuple[FIDInception, torch.Tensor] | None = None) -> dict:
    """Generate `num_samples` images (classes in turn) for each `Setting` of `sweep` (sampler, steps, guidance) and
    measure them against `reference`; each result also has the sampling wall-clock time per image. With
    `inception` = (the FID Inception, its features of the reference images), also the standard FID."""
    labels = torch.arange(num_samples) % num_classes
    prompts = class_prompts(pipe, labels.tolist())
    results = []
    for setting in sweep:
        images, start_time = [], time.perf_counter()
        for start in tqdm(range(0, num_samples, batch_size), desc=f"samples {setting.label()}", disable=not progress):
            images.append(pipe.generate_tensors(prompts[start:start + batch_size], steps=setting.steps,
                                                guidance_scale=setting.guidance, sampler=setting.sampler,
                                                seed=seed + start, progress=False))
        seconds = time.perf_counter() - start_time
        features, predicted = extract(model, torch.cat(images))
        kid_mean, kid_std = kid(features, reference)
        results.append({**setting.as_dict(), "fid": fid(features, reference), "kid": kid_mean, "kid_std": kid_std,
                        "class_accuracy": float((predicted == labels).float().mean()),
                        "diversity": within_class_spread(features, labels),
                        "seconds_per_image": seconds / num_samples})
        if inception is not None:
            results[-1]["inception_fid"] = fid(inception_features(inception[0], torch.cat(images)), inception[1])
    return {"num_samples": num_samples, "seed": seed, "reference_images": len(reference),
            "features": "domain feature network (not Inception): comparable only with itself", "results": results,
            **({"inception_fid": "the standard FID: Inception v3 (2015-12-05 graph) pool features"} if inception
               else {})}
