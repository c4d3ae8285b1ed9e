"""Class-label conditioning: which class a prompt asks for."""

from pathlib import Path

import pytest

from latent_diffusion.conditioning.classes import class_label
from latent_diffusion.config import ConditioningConfig, ConfigError, LDMRunConfig, load_config


def test_class_prompts_name_the_class_or_give_its_number():
    cfg = load_config(Path(__file__).parents[2] / "configs/ldm/fashion.yaml", LDMRunConfig).conditioning
    assert [class_label(p, cfg) for p in ("a photo of a sneaker", "a photo of a t-shirt", "Shirt", "3",
                                          "an ankle boot")] == [7, 0, 6, 3, 9]
    with pytest.raises(ValueError, match=r"a class name \(t-shirt, .*\) or a label number 0 to 9, got 'a cat'"):
        class_label("a cat", cfg)
    with pytest.raises(ValueError, match="a label number 0 to 2, got 'x'"):
        class_label("x", ConditioningConfig(encoder="class", num_classes=3))
    with pytest.raises(ConfigError, match="conditioning.class_names"):
        ConditioningConfig(encoder="class", num_classes=3, class_names=("a", "b"))
