"""AdamNormGrad vs Adam on the Exemplar protocol's first epochs: same seed, same data."""
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, ".")
from bench.config import RunConfig
from bench.data import load_dataset
from bench.train import fit
data = load_dataset("fashion-mnist", "dynamic")
out = {}
for seed in (0, 1):
    for opt in ("adam", "adamnormgrad"):
        cfg = RunConfig(model="vae", loss="bce", arch="gated", latent=40, dataset="fashion-mnist", binarize="dynamic",
                        optimizer=opt, lr=5e-4, batch_size=100, epochs=12, warmup_epochs=100, warmup_schedule="epoch",
                        seed=seed, device="cpu", eval_k=10, eval_n=10)
        t = time.time()
        r = fit(cfg, data, progress=False)
        out[f"{opt} seed {seed}"] = [round(h["val/elbo"], 2) for h in r.history]
        print(opt, seed, out[f"{opt} seed {seed}"], f"{time.time()-t:.0f} s", flush=True)
json.dump(out, open("results/adamnormgrad.json", "w"), indent=1)
