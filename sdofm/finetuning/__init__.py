"""Science heads on pretrained backbones, trained with Ray Train and swept with Ray Tune."""
