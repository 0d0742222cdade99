import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.images import (MARGIN, PLOT, TAB10, class_grid, draw_scatter, interpolation_grid, latent_scatter,
                          make_grid, project_2d, reconstruction_grid, samples_grid, save_png, to_png_bytes)


class TinyVAE(torch.nn.Module):
    """A real, linear VAE on 1x8x8 images with the interface bench.images expects; it records
    the mode it was called in, so the tests can check the pictures are taken in eval mode."""

    def __init__(self, latent=2, num_classes=0):
        super().__init__()
        torch.manual_seed(0)
        self.latent, self.conditional = latent, num_classes > 0
        self.num_classes = num_classes or 10
        extra = num_classes
        self.encoder = torch.nn.Linear(64 + extra, 2 * latent)
        self.decoder = torch.nn.Linear(latent + extra, 64)
        self.calls = []  # (training, grad enabled) of each call

    def _with_label(self, h, y):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return torch.cat([h, F.one_hot(y, self.num_classes).float()], 1) if self.conditional else h

    def encode(self, x, y=None):
        mu, log_sigma = self.encoder(self._with_label(x.flatten(1), y)).chunk(2, dim=1)
        return mu, log_sigma.exp()

    def decode(self, z, y=None):
        return self.decoder(self._with_label(z, y)).view(-1, 1, 8, 8)

    def mean_image(self, z, y=None):
        return torch.sigmoid(self.decode(z, y))

    def sample(self, n, y=None, generator=None):
        return self.mean_image(torch.randn(n, self.latent, generator=generator), y)


@pytest.fixture(scope="module")
def digits():
    """20 random 1x8x8 images in [0, 1], two per label 0..9 (sklearn's digits would cost 2 s
    of imports and show nothing more)."""
    images = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(20) % 10


def cell(grid, row, col, size=8, padding=2):
    """The pixels of one image in a grid."""
    top, left = padding + row * (size + padding), padding + col * (size + padding)
    return grid[top:top + size, left:left + size]


def test_make_grid_tiles_images_row_major_with_torchvision_geometry():
    images = np.arange(10).reshape(10, 1, 1, 1) * 25 / 255 * np.ones((1, 1, 8, 8))  # image i: i*25
    grid = make_grid(images, nrow=5, padding=2)
    assert grid.shape == (2 * 8 + 3 * 2, 5 * 8 + 6 * 2) and grid.dtype == np.uint8
    for i in range(10):
        assert (cell(grid, i // 5, i % 5) == i * 25).all()
    assert (grid[:2] == 255).all() and (grid[:, 10:12] == 255).all()  # padding is pad_value
    assert (make_grid(images, nrow=5, pad_value=0.0)[:2] == 0).all()


def test_make_grid_colour_torch_input_short_last_row_and_scale():
    images = torch.zeros(3, 3, 4, 4)
    images[:, 0] = 1.0  # red
    grid = make_grid(images, nrow=2, padding=1, pad_value=0.0, scale=3)
    assert grid.shape == (3 * (2 * 5 + 1), 3 * (2 * 5 + 1), 3)
    assert (grid[3:15, 3:15] == [255, 0, 0]).all()            # first image, 3x enlarged
    assert (grid[18:30, 18:30] == 0).all()                     # the empty fourth cell
    assert make_grid(torch.full((2, 1, 3, 3), float("nan")), nrow=2)[3, 3] == 0


def test_make_grid_rejects_images_that_are_not_nchw():
    with pytest.raises(ValueError, match=r"\(N>0, 1 or 3, H, W\)"):
        make_grid(np.zeros((4, 8, 8)), nrow=2)


def test_samples_grid_is_square_and_the_same_for_the_same_seed():
    model = TinyVAE()
    grid = samples_grid(model, n=64, seed=1)
    assert grid.shape == (8 * 10 + 2, 8 * 10 + 2) and grid.dtype == np.uint8
    assert (grid == samples_grid(model, n=64, seed=1)).all()
    assert (grid != samples_grid(model, n=64, seed=2)).any()


def test_samples_grid_of_a_conditional_model_has_one_class_per_column():
    model = TinyVAE(num_classes=3)
    grid = samples_grid(model, n=10, seed=0)  # 10 // 3 = 3 per class
    expected = model.sample(9, torch.tensor([0, 1, 2] * 3),
                            generator=torch.Generator().manual_seed(0))
    assert (grid == make_grid(expected.detach(), nrow=3)).all()


def test_pictures_are_taken_in_eval_mode_without_grad_and_the_mode_is_restored(digits):
    x, y = digits
    model = TinyVAE(num_classes=10)
    model.train()
    reconstruction_grid(model, x, y)
    interpolation_grid(model, x[:4], y[:4])
    latent_scatter(model, x, y)
    class_grid(model, per_class=2)
    assert set(model.calls) == {(False, False)} and model.training


def test_reconstruction_grid_puts_each_row_of_originals_above_its_reconstructions(digits):
    x, _ = digits
    model = TinyVAE()
    grid = reconstruction_grid(model, x[:12], nrow=5)
    assert grid.shape == (6 * 10 + 2, 5 * 10 + 2)  # rows: 5 originals, 5 recons, 5, 5, 2, 2
    reconstructions = torch.sigmoid(model.decode(model.encode(x[:12])[0])).detach()
    for i in range(12):
        pair, col = divmod(i, 5)
        original, reconstruction = cell(grid, 2 * pair, col), cell(grid, 2 * pair + 1, col)
        assert (original == make_grid(x[i:i + 1], nrow=1, padding=0)).all()
        assert (reconstruction == make_grid(reconstructions[i:i + 1], nrow=1, padding=0)).all()
    assert (cell(grid, 5, 2) == 255).all()  # no 13th image


def test_reconstruction_grid_of_a_conditional_model_needs_labels(digits):
    with pytest.raises(ValueError, match="pass the labels y"):
        reconstruction_grid(TinyVAE(num_classes=10), digits[0])


@pytest.mark.parametrize("num_classes", [0, 10])
def test_interpolation_rows_start_and_end_at_the_decoded_encoder_means(digits, num_classes):
    x, y = digits[0][:6], digits[1][:6]
    model = TinyVAE(latent=5, num_classes=num_classes)
    grid = interpolation_grid(model, x, y, steps=7)
    assert grid.shape == (3 * 10 + 2, 7 * 10 + 2)
    mu = model.encode(x, y)[0]
    start_labels = y[0::2].repeat_interleave(2)  # a row keeps its first image's label
    ends = torch.sigmoid(model.decode(mu, start_labels)).detach()
    for pair in range(3):
        for col, image in [(0, ends[2 * pair]), (6, ends[2 * pair + 1])]:
            expected = make_grid(image[None], nrow=1, padding=0).astype(int)
            assert np.abs(cell(grid, pair, col).astype(int) - expected).max() <= 1  # float rounding


def test_interpolation_needs_pairs(digits):
    with pytest.raises(ValueError, match="even number"):
        interpolation_grid(TinyVAE(), digits[0][:3])


@pytest.mark.parametrize("latent", [1, 2, 5])
def test_latent_scatter_renders_an_rgb_figure_for_any_latent_size(digits, latent):
    x, y = digits
    picture = latent_scatter(TinyVAE(latent=latent), x, y)
    assert picture.shape == (400, 500, 3) and picture.dtype == np.uint8
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 10  # points, legend, title drawn
    if latent == 1:  # the jitter is seeded
        assert (picture == latent_scatter(TinyVAE(latent=latent), x, y, seed=0)).all()


def test_a_scatter_point_lands_where_its_coordinates_say_in_its_labels_colour():
    # corners of the data's range map to the frame's inner corners: (left + margin, bottom - margin) etc.
    points = np.array([[-1.0, 10.0], [3.0, 30.0], [1.0, 20.0], [np.nan, 0.0]])
    picture = draw_scatter(points, np.array([0, 1, 2, 3]), "three points")
    left, top, right, bottom = PLOT
    assert tuple(picture[bottom - MARGIN, left + MARGIN]) == TAB10[0]   # (-1, 10): lowest x and y
    assert tuple(picture[top + MARGIN, right - MARGIN]) == TAB10[1]     # (3, 30): highest
    assert tuple(picture[(top + bottom) // 2, (left + right) // 2]) == TAB10[2]  # (1, 20): the middle
    assert not (picture[top + 1:bottom, left + 1:right] == TAB10[3]).all(axis=-1).any()  # NaN: not drawn
    assert tuple(picture[bottom, (left + right) // 2]) == (0, 0, 0)  # the frame


def test_a_scatter_of_no_finite_point_is_still_a_picture():
    picture = draw_scatter(np.full((5, 2), np.nan), np.zeros(5, dtype=int), "diverged")
    assert picture.shape == (400, 500, 3)
    inside = picture[PLOT[1] + 1:PLOT[3], PLOT[0] + 1:PLOT[2]]
    assert (inside == 255).all()  # nothing drawn, and no exception


def test_project_2d_names_the_projection_and_pca_keeps_a_planes_distances():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 5))  # 5-D points on a 2-D plane
    points, title = project_2d(plane, np.zeros(30, dtype=int))
    assert title == "PCA of 5-D latent means (100% of variance)"
    distances = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distances(points), distances(plane), atol=1e-9)
    assert project_2d(plane[:, :2], None)[1] == "2-D latent means"
    points, title = project_2d(plane[:, :1], np.arange(30))
    assert title == "1-D latent means against label"
    assert (np.abs(points[:, 1] - np.arange(30)) <= 0.3).all()


def test_pca_keeps_the_two_widest_axes_and_says_how_much_variance_they_hold():
    rng = np.random.default_rng(1)
    axes, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # a random rotation
    centred = rng.normal(size=(2000, 4))
    unit, _ = np.linalg.qr(centred - centred.mean(0))  # uncorrelated columns with mean 0
    scores = unit * np.sqrt(2000) * [3.0, 2.0, 1.0, 0.5]  # variances 9, 4, 1, 0.25
    points, title = project_2d(scores @ axes.T, np.zeros(2000, dtype=int))
    assert title == f"PCA of 4-D latent means ({13 / 14.25:.0%} of variance)"  # 91%
    np.testing.assert_allclose(np.abs(points), np.abs(scores[:, :2]), atol=1e-9)  # up to each axis' sign


def test_class_grid_has_one_row_per_class_and_needs_a_conditional_model():
    model = TinyVAE(num_classes=3)
    grid = class_grid(model, per_class=4, seed=0)
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2)
    expected = model.sample(12, torch.tensor([0] * 4 + [1] * 4 + [2] * 4),
                            generator=torch.Generator().manual_seed(0))
    assert (grid == make_grid(expected.detach(), nrow=4)).all()
    with pytest.raises(ValueError, match="conditional model"):
        class_grid(TinyVAE())


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3)])
def test_png_round_trips_exactly(tmp_path, shape):
    picture = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert (np.array(Image.open(io.BytesIO(to_png_bytes(picture)))) == picture).all()
    path = save_png(picture, tmp_path / "picture.png")
    assert (np.array(Image.open(path)) == picture).all()
    with pytest.raises(ValueError, match="uint8"):
        to_png_bytes(picture / 255)
