"""Named configurations. A preset is a dict of RunConfig fields; `bench train --preset NAME`
starts from it and command-line flags override it."""

from bench.registry import PRESETS


@PRESETS.register("seed-vae")
def seed_vae() -> dict:
    """The seed tutorial's VAE exactly: seed arch, latent 32, seed BCE, Adam 1e-4, batch 64."""
    return dict(model="vae", arch="seed", loss="seed-bce", latent=32, lr=1e-4, batch_size=64,
                dropout=0.1, beta=1.0)


@PRESETS.register("seed-cvae")
def seed_cvae() -> dict:
    """The seed tutorial's CVAE: as seed-vae, with the one-hot label fed to encoder and decoder."""
    return {**seed_vae(), "model": "cvae"}
