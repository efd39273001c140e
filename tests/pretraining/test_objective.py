"""The pretraining objectives' per-sample reconstruction scores (what `sdofm evaluate` and
validation report): fixed draws per sample id, shared by every model of one architecture."""

from __future__ import annotations

import torch

from sdofm.config import load_config
from sdofm.pretraining.objective import scoring_objective

CHANNELS = load_config().data.channels
KWARGS = {"img_size": 32, "in_chans": 12, "num_frames": 1}


def test_masks_follow_the_sample_id_not_the_batch_or_the_weights():
    objective = scoring_objective("mae", "mae_debug", KWARGS, CHANNELS, seed=3)
    a, b = (objective.build_model().eval() for _ in range(2))  # two random weight draws
    imgs = torch.randn(3, 12, 1, 32, 32)
    with torch.no_grad():
        one = objective.masked_forward(a, imgs, [7, 8, 9])["mask"]
        other = objective.masked_forward(b, imgs[[2, 0]], [9, 7])["mask"]
        assert torch.equal(other, one[[2, 0]])  # same id, same mask; batching plays no part
        assert one.sum(1).tolist() == [12.0] * 3 and not torch.equal(one[0], one[1])
        seed4 = scoring_objective("mae", "mae_debug", KWARGS, CHANNELS, seed=4)
        assert not torch.equal(seed4.masked_forward(a, imgs, [7, 8, 9])["mask"], one)
        # sample_errors is the loss on those masks, per sample and channel
        sums, weight = objective.sample_errors(a, imgs, [7, 8, 9])
        out = objective.masked_forward(a, imgs, [7, 8, 9])
    assert sums.shape == (3, 12) and weight.tolist() == [12.0] * 3
    torch.testing.assert_close((sums.sum(0) / weight.sum()).mean(), out["loss"])


def test_nvae_scores_are_the_reconstruction_term_per_channel_on_fixed_draws():
    objective = scoring_objective("nvae", "nvae_debug", KWARGS, CHANNELS, seed=0)
    model = objective.build_model().eval()
    imgs = torch.randn(2, 12, 1, 32, 32)
    err, weight = objective.sample_errors(model, imgs, [5, 6])
    again, _ = objective.sample_errors(model, imgs, [5, 6])
    assert err.shape == (2, 12) and weight.tolist() == [1.0, 1.0]
    assert torch.equal(err, again)  # the posterior draws are fixed
    with torch.no_grad():
        recon = model(imgs)["recon"]
    # another posterior draw gives another value, close to the same mean over channels
    torch.testing.assert_close(err.mean(), recon, rtol=0.05, atol=0.05)
