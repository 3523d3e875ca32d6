"""The instant warp (schedules/warp.py) moves content where the points say, and nothing else.

The pure warp is tested on latents built by hand; the schedule runs end to end on the toy backbone,
whose features are the latent, so a move is exact there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gooddrag.schedules.warp import warp_latent

H = W = 32


def blob(center, size=(H, W), sigma=1.5, channels=4):
    rows, cols = torch.meshgrid(torch.arange(size[0]).float(), torch.arange(size[1]).float(), indexing="ij")
    g = torch.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma ** 2))
    return g.expand(1, channels, *size).clone()  # (1, C, h, w)


def peak(z):
    i = int(z[0, 0].argmax())
    return np.array(divmod(i, z.shape[-1]))


def pts(*rc):
    return torch.tensor(rc, dtype=torch.float32)


@pytest.mark.parametrize("combine", ["nearest", "blend"])
@pytest.mark.parametrize("fill", ["nearest", "noise"])
def test_a_blob_at_the_handle_ends_at_the_target(combine, fill):
    z = blob((10, 8))
    out, _ = warp_latent(z, pts((10, 8)), pts((13, 20)), None, combine=combine, fill=fill,
                         noise=torch.zeros_like(z))
    assert np.abs(peak(out) - [13, 20]).max() <= 1  # within one latent pixel
    assert float(out[0, 0, 13, 20]) > 0.95  # the blob itself, not a smear of it
    assert float(out[0, 0, 10, 8]) < 0.05  # and it left the handle


def test_outside_the_mask_the_latent_is_the_input_bit_for_bit():
    torch.manual_seed(0)
    z = torch.randn(1, 4, H, W)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 4:20, 2:24] = 1
    out, revealed = warp_latent(z, pts((10, 6)), pts((12, 16)), mask, noise=torch.randn(1, 4, H, W))
    fixed = (mask == 0).expand_as(z)
    assert torch.equal(out[fixed], z[fixed])
    assert not bool(revealed[mask == 0].any())
    assert not torch.equal(out, z)  # inside, it moved


def test_two_pairs_move_two_blobs_independently():
    z = blob((8, 6)) + blob((24, 26))
    handles, targets = pts((8, 6), (24, 26)), pts((8, 14), (18, 26))
    out, _ = warp_latent(z, handles, targets, None, fill="nearest")
    for target in ((8, 14), (18, 26)):
        assert float(out[0, 0, target[0], target[1]]) > 0.95
    for handle in ((8, 6), (24, 26)):
        assert float(out[0, 0, handle[0], handle[1]]) < 0.05
    # each blob moved exactly as it does when dragged alone
    alone1, _ = warp_latent(z, handles[:1], targets[:1], None, fill="nearest")
    alone2, _ = warp_latent(z, handles[1:], targets[1:], None, fill="nearest")
    assert torch.equal(out[..., 4:13, 2:19], alone1[..., 4:13, 2:19])
    assert torch.equal(out[..., 14:29, 21:31], alone2[..., 14:29, 21:31])


def test_revealed_positions_get_fresh_noise():
    torch.manual_seed(1)
    z = torch.randn(1, 4, H, W)
    noise = torch.randn(1, 4, H, W) + 100  # unmistakable
    out, revealed = warp_latent(z, pts((16, 10)), pts((16, 20)), None, fill="noise", noise=noise)
    r = revealed.expand_as(z)
    assert int(revealed.sum()) > 0
    assert torch.equal(out[r], noise[r])
    assert float(out[~r].max()) < 50  # noise nowhere else


def test_revealed_positions_copy_their_nearest_source_neighbour():
    torch.manual_seed(2)
    z = torch.randn(1, 4, H, W)
    out, revealed = warp_latent(z, pts((16, 10)), pts((16, 20)), None, fill="nearest")
    holes = revealed[0, 0].nonzero().tolist()
    kept = (~revealed[0, 0]).nonzero().float()
    assert holes
    for r, c in holes:
        near = kept[((kept - torch.tensor([r, c]).float()) ** 2).sum(1).argmin()].long().tolist()
        assert torch.equal(out[0, :, r, c], out[0, :, near[0], near[1]])


def test_bad_choices_are_refused():
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="combine"):
        warp_latent(z, pts((1, 1)), pts((2, 2)), None, combine="sum")
    with pytest.raises(ValueError, match="noise tensor"):
        warp_latent(z, pts((1, 1)), pts((2, 2)), None, fill="noise")
