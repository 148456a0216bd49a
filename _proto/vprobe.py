import sys, time, json, torch, numpy as np
from transformers import InternVLVisionConfig, InternVLVisionModel
from raylens.images import TilingSpec, prepare_image, pixel_values_for
from raylens.demo import shapes
torch.set_num_threads(2); dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = json.loads(sys.argv[1]); tile = cfg.pop("tile", 112); steps = cfg.pop("steps", 600); lr = cfg.pop("lr", 1e-3); bs = cfg.pop("bs", 32)
ntrain = cfg.pop("ntrain", 20000)
spec = TilingSpec(tile_size=tile, max_tiles=1, use_thumbnail=True)
SH = {s: i for i, s in enumerate(shapes.SHAPES)}
def make(n, seed, split):
    X, Y = [], []
    for im, c, a in shapes.generate_dataset(n, seed, split):
        X.append(pixel_values_for(prepare_image(im, spec), spec)[0]); Y.append(SH[a.shape])
    return torch.from_numpy(np.stack(X)), torch.tensor(Y)
t = time.time(); Xtr, Ytr = make(ntrain, 0, "train"); Xte, Yte = make(500, 1, "held_out"); print("data", time.time() - t, flush=True)
torch.manual_seed(0)
vc = InternVLVisionConfig(image_size=tile, **cfg)
vm = InternVLVisionModel(vc).to(dev); head = torch.nn.Linear(vc.hidden_size, 4).to(dev); Xtr, Ytr, Xte, Yte = Xtr.to(dev), Ytr.to(dev), Xte.to(dev), Yte.to(dev)
params = list(vm.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
def fwd(x):
    h = vm(pixel_values=x).last_hidden_state[:, 1:]
    return head(h.mean(1))
t = time.time()
for step in range(steps):
    idx = torch.randint(0, ntrain, (bs,), device=dev)
    for g in opt.param_groups: g["lr"] = lr * min(1, (step + 1) / 100)
    loss = torch.nn.functional.cross_entropy(fwd(Xtr[idx]), Ytr[idx]); opt.zero_grad(); loss.backward(); opt.step()
    if (step + 1) % 500 == 0:
        with torch.no_grad(): acc = (fwd(Xte).argmax(-1) == Yte).float().mean().item()
        print(sys.argv[1], step + 1, f"loss {loss.item():.3f} acc {acc:.3f} t {time.time()-t:.0f}", flush=True)
