"""The domain feature network: it learns classes, and round-trips through its folder."""

import json

import torch

from latent_diffusion.evaluation.features import (FeatureNetConfig, extract, load_feature_net, save_feature_net,
                                                  train_feature_net)


class _Labelled(torch.utils.data.Dataset):
    """Two classes a feature net can tell apart: bright squares top-left vs bottom-right."""

    def __init__(self, n=64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = -torch.ones(1, 32, 32)
        label = i % 2
        if label == 0:
            image[:, 4:14, 4:14] = 1.0
        else:
            image[:, 18:28, 18:28] = 1.0
        return {"image": image + 0.05 * torch.randn(1, 32, 32), "label": label}


def test_feature_net_learns_classes_and_round_trips_through_its_folder(tmp_path):
    cfg = FeatureNetConfig(num_classes=2, width=8, feature_dim=16)
    model = train_feature_net(_Labelled(), cfg, epochs=3, batch_size=16, progress=False)
    images = torch.stack([_Labelled()[i]["image"] for i in range(16)])
    features, predicted = extract(model, images)
    assert features.shape == (16, 16) and (predicted == torch.arange(16) % 2).float().mean() >= 0.9
    save_feature_net(model, tmp_path / "features", {"test_accuracy": 1.0})
    again = load_feature_net(tmp_path / "features")
    assert torch.equal(extract(again, images)[0], features)
    assert json.loads((tmp_path / "features" / "features.json").read_text())["test_accuracy"] == 1.0
