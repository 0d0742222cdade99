"""Pictures of a trained model (samples, reconstructions, interpolations, its latent space) as
uint8 numpy arrays, HxW for grey and HxWx3 for colour, ready for `mlflow.log_image` or a PNG.

Models are used duck-typed through `encode(x, y) -> (mu, sigma)`, `decode(z, y) -> logits` and
`sample(n, y, generator)`; every picture is a function of the model, the data and a seed, so
the same checkpoint always logs the same images. All are drawn with numpy and PIL: no window
opens, no plotting backend is loaded into a worker.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# matplotlib's default colour cycle (tab10), the colours the latent pictures had when matplotlib drew them
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PLOT, MARGIN = (60, 36, 420, 370), 6  # the scatter's frame (left, top, right, bottom) and inner margin, px


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: float = 1.0,
              scale: int = 1) -> np.ndarray:
    """Tiles (N, C, H, W) images in [0, 1] (numpy or torch), `nrow` per row, row-major, with
    torchvision.utils.make_grid's geometry; C=1 gives HxW, C=3 gives HxWx3. `scale` enlarges
    every pixel (nearest) so 8x8 digits stay visible in the MLflow UI. A short last row is
    left as `pad_value`; NaN pixels (a diverged model) are drawn black instead of failing."""
    images = _numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"make_grid needs images shaped (N>0, 1 or 3, H, W), got {images.shape}")
    n, channels, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((channels, rows * (h + padding) + padding, cols * (w + padding) + padding),
                   pad_value, dtype=np.float32)
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    pixels = (np.clip(np.nan_to_num(grid), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)


def samples_grid(model, n: int = 64, seed: int = 0, scale: int = 1) -> np.ndarray:
    """Mean images decoded from `n` prior draws, square-ish: the first look at what a model
    generates. A conditional model gets n // num_classes draws per class, one class per column."""
    labels = None
    if _conditional(model):
        per_class = max(1, n // model.num_classes)
        labels = torch.arange(model.num_classes, device=_device(model)).repeat(per_class)
        n, nrow = len(labels), model.num_classes
    else:
        nrow = math.ceil(math.sqrt(n))
    with _evaluating(model):
        images = model.sample(n, labels, generator=_generator(model, seed))
    return make_grid(images, nrow=nrow, scale=scale)


def reconstruction_grid(model, x, y=None, nrow: int = 10, scale: int = 1) -> np.ndarray:
    """Originals in one row and their reconstructions, the mean of p(x|mu), in the row below
    (pairs of rows when there are more than `nrow` images), so each can be compared by eye."""
    x = _tensor(x, model)
    with _evaluating(model):
        labels = _labels(model, y)
        mu, _ = model.encode(x, labels)
        reconstructions = model.mean_image(mu, labels)
    originals, reconstructions = _numpy(x), _numpy(reconstructions)
    nrow = min(nrow, len(x))
    blank = np.ones((nrow, *originals.shape[1:]), dtype=np.float32)  # fills a short last pair
    rows = []
    for start in range(0, len(x), nrow):
        for images in (originals, reconstructions):
            chunk = images[start:start + nrow]
            rows += [chunk, blank[len(chunk):]]
    return make_grid(np.concatenate(rows), nrow=nrow, scale=scale)


def interpolation_grid(model, x, y=None, steps: int = 10, scale: int = 1) -> np.ndarray:
    """One row per pair (x[0] -> x[1], x[2] -> x[3], ...): images decoded at `steps` evenly
    spaced points on the line between the pair's encoder means, ends included; a smooth row
    means the latent space has no holes between them. A conditional model decodes the whole
    row with the first image's label, so only the style changes along it."""
    if len(x) < 2 or len(x) % 2:
        raise ValueError(f"interpolation_grid needs an even number of images (pairs), got {len(x)}")
    if steps < 2:
        raise ValueError(f"interpolation_grid needs steps >= 2 (both ends), got {steps}")
    x = _tensor(x, model)
    with _evaluating(model):
        labels = _labels(model, y)
        mu, _ = model.encode(x, labels)
        start, end = mu[0::2, None], mu[1::2, None]                                # (P, 1, L)
        t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype)[:, None]  # (S, 1)
        z = ((1 - t) * start + t * end).flatten(0, 1)                               # (P*S, L)
        row_labels = None if labels is None else labels[0::2].repeat_interleave(steps)
        images = model.mean_image(z, row_labels)
    return make_grid(images, nrow=steps, scale=scale)


def latent_scatter(model, x, y, seed: int = 0) -> np.ndarray:
    """Encoder means of `x` coloured by label `y`, as a rendered HxWx3 figure: classes that
    separate although the encoder never saw the labels show what the code has learned.
    See `project_2d` for how latents other than 2-D are drawn (the title says which)."""
    x = _tensor(x, model)
    with _evaluating(model):
        mu, _ = model.encode(x, _labels(model, y))
    labels = _numpy(y).astype(int)
    points, title = project_2d(_numpy(mu), labels, seed=seed)
    return draw_scatter(points, labels, title)


def draw_scatter(points: np.ndarray, labels: np.ndarray, title: str) -> np.ndarray:
    """(N, 2) points coloured by label on a 500x400 canvas: frame, the axes' ranges, title and
    legend. Drawn with PIL, not matplotlib: 12 ms against 260 ms measured here, and a trial
    draws it at every slider step, so matplotlib's figure was most of the tracking overhead.
    Non-finite points (a diverged model) are left out and counted in the title."""
    image = Image.new("RGB", (500, 400), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    left, top, right, bottom = PLOT
    finite = np.isfinite(points).all(axis=1)
    low, high = (points[finite].min(axis=0), points[finite].max(axis=0)) if finite.any() else (np.zeros(2),) * 2
    span = np.where(high > low, high - low, 1.0)
    u = left + MARGIN + (points[:, 0] - low[0]) / span[0] * (right - left - 2 * MARGIN)
    v = bottom - MARGIN - (points[:, 1] - low[1]) / span[1] * (bottom - top - 2 * MARGIN)  # up is +y
    classes = np.unique(labels)
    for label in classes:  # class by class, the last drawn on top
        for i in np.flatnonzero((labels == label) & finite):
            draw.ellipse([u[i] - 2, v[i] - 2, u[i] + 2, v[i] + 2], fill=TAB10[label % 10])
    draw.rectangle(PLOT, outline="black")
    dropped = int((~finite).sum())
    title += f" ({dropped} non-finite left out)" if dropped else ""
    draw.text(((left + right - draw.textlength(title, font=font)) / 2, 12), title, fill="black", font=font)
    for value, x_at, y_at, flush_right in ((low[0], left, bottom + 4, False), (high[0], right, bottom + 4, True),
                                           (low[1], left - 4, bottom - 14, True), (high[1], left - 4, top, True)):
        text = f"{value:.3g}"
        draw.text((x_at - draw.textlength(text, font=font) * flush_right, y_at), text, fill="black", font=font)
    draw.text((right + 20, top), "label", fill="black", font=font)
    for row, label in enumerate(classes):
        y0 = top + 20 + 16 * row
        draw.ellipse([right + 20, y0 + 2, right + 30, y0 + 12], fill=TAB10[label % 10])
        draw.text((right + 36, y0), str(label), fill="black", font=font)
    return np.asarray(image).copy()


def project_2d(means: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, latent) encoder means -> (N, 2) points to plot and a title naming the projection.
    2-D is kept as is; more dims go onto their first two principal axes (the title
    gives the share of variance kept); 1-D is plotted against the label with seeded jitter."""
    latent = means.shape[1]
    if latent == 1:
        jitter = np.random.default_rng(seed).uniform(-0.3, 0.3, len(means))
        return np.column_stack([means[:, 0], labels + jitter]), "1-D latent means against label"
    if latent == 2:
        return means, "2-D latent means"
    # torch, not numpy: numpy's BLAS threads ignore a worker's thread count, and two of them per
    # worker on two busy cores made this 1 ms step take 235 ms (measured)
    centred = torch.from_numpy(np.asarray(means, dtype=np.float64))
    centred = centred - centred.mean(dim=0)
    variances, axes = torch.linalg.eigh(centred.T @ centred)  # ascending
    kept = float(variances[-2:].sum() / max(float(variances.sum()), np.finfo(float).tiny))
    return (centred @ axes[:, [-1, -2]]).numpy(), f"PCA of {latent}-D latent means ({kept:.0%} of variance)"


def class_grid(model, per_class: int = 10, seed: int = 0, scale: int = 1) -> np.ndarray:
    """One row of samples per class of a conditional model: does each label get its class?"""
    if not _conditional(model):
        raise ValueError(f"class_grid needs a conditional model (e.g. cvae); "
                         f"{type(model).__name__} is not conditioned on labels")
    labels = torch.arange(model.num_classes, device=_device(model)).repeat_interleave(per_class)
    with _evaluating(model):
        images = model.sample(len(labels), labels, generator=_generator(model, seed))
    return make_grid(images, nrow=per_class, scale=scale)


def to_png_bytes(array: np.ndarray) -> bytes:
    """PNG-encodes an HxW or HxWx3 uint8 picture (lossless, so pixels round-trip exactly)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"to_png_bytes needs an HxW or HxWx3 uint8 array, got "
                         f"{array.dtype} {array.shape}; make one with make_grid")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(array: np.ndarray, path) -> Path:
    """Writes the picture to `path` as PNG and returns the path."""
    path = Path(path)
    path.write_bytes(to_png_bytes(array))
    return path


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode and no autograd while pictures are taken, then the caller's mode back: a
    picture logged mid-training must not leave dropout or batch norm switched off."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _conditional(model) -> bool:
    return bool(getattr(model, "conditional", False))


def _labels(model, y):
    """The labels to pass on: required by a conditional model, None for any other."""
    if not _conditional(model):
        return None
    if y is None:
        raise ValueError(f"{type(model).__name__} is conditional: pass the labels y of x")
    return torch.as_tensor(y, dtype=torch.long, device=_device(model))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _generator(model, seed: int) -> torch.Generator:
    """On the model's device, where `model.sample` draws its latents."""
    return torch.Generator(device=_device(model)).manual_seed(seed)


def _tensor(x, model) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=_device(model))


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().float().numpy()
    return np.asarray(a)
