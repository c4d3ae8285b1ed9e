"""Sample quality of a class- or caption-conditional model with a domain feature network: FID, KID, class
accuracy of conditional samples and within-class diversity, per guidance scale; JSON figures and a PNG plot."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latent_diffusion.data.fashion_mnist import caption_for
from latent_diffusion.evaluation.features import FeatureNet, extract
from latent_diffusion.evaluation.fid import fid, kid


def reference_features(model: FeatureNet, dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """Features of (the first `limit`) real images of `dataset`."""
    images = [batch["image"] for batch in DataLoader(dataset, batch_size=500)]
    images = torch.cat(images)[:limit]
    return extract(model, images)[0]


def class_prompts(pipe, labels: list[int]) -> list[str]:
    """What a model is asked for each label: the label number (class-conditional) or `a photo of a {class}`."""
    return [str(label) for label in labels] if pipe.config.conditioning.encoder == "class" else \
        [caption_for(label) for label in labels]


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance among samples of the same class, averaged over classes (diversity)."""
    spreads = [torch.pdist(features[labels == c].double()).mean() for c in labels.unique()
               if int((labels == c).sum()) > 1]
    return float(torch.stack(spreads).mean()) if spreads else float("nan")


@torch.no_grad()
def evaluate_samples(pipe, model: FeatureNet, reference: torch.Tensor, num_samples: int, sweep: list,
                     num_classes: int = 10, seed: int = 0, batch_size: int = 250, progress: bool = True) -> dict:
    """Generate `num_samples` images (classes in turn) for each `Setting` of `sweep` (sampler, steps, guidance) and
    measure them against `reference`."""
    labels = torch.arange(num_samples) % num_classes
    prompts = class_prompts(pipe, labels.tolist())
    results = []
    for setting in sweep:
        images = []
        for start in tqdm(range(0, num_samples, batch_size), desc=f"samples {setting.label()}", disable=not progress):
            images.append(pipe.generate_tensors(prompts[start:start + batch_size], steps=setting.steps,
                                                guidance_scale=setting.guidance, sampler=setting.sampler,
                                                seed=seed + start, progress=False))
        features, predicted = extract(model, torch.cat(images))
        kid_mean, kid_std = kid(features, reference)
        results.append({**setting.as_dict(), "fid": fid(features, reference), "kid": kid_mean, "kid_std": kid_std,
                        "class_accuracy": float((predicted == labels).float().mean()),
                        "diversity": within_class_spread(features, labels)})
    return {"num_samples": num_samples, "seed": seed, "reference_images": len(reference),
            "features": "domain feature network (not Inception): comparable only with itself", "results": results}
