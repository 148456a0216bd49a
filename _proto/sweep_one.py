"""Temporary hyper-parameter sweep helper (not shipped; deleted after use)."""
import sys, types, time, json, torch
from transformers import InternVLConfig, InternVLForConditionalGeneration
tiny = types.ModuleType("raylens.checkpoints.tiny"); sys.modules["raylens.checkpoints.tiny"] = tiny
def build_hf_model(size="tiny", llm="qwen2", seed=0, tokenizer=None, dtype=torch.float32, device="cpu", vision_config=None, text_config=None, layer_scale=0.1):
    torch.manual_seed(seed)
    v = len(tokenizer)
    cfg = InternVLConfig(vision_config=dict(vision_config, layer_scale_init_value=layer_scale), text_config=dict(text_config, model_type="qwen2", vocab_size=v, tie_word_embeddings=True, rms_norm_eps=1e-6),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=16, tie_word_embeddings=True)
    return InternVLForConditionalGeneration(cfg).to(dtype), tokenizer
tiny.build_hf_model = build_hf_model
from jobs import train_demo as td
from raylens.demo import shapes

cfg = json.loads(sys.argv[1]); name = cfg.pop("name")
dev = cfg.pop("device", "cuda"); steps = cfg.pop("steps", 3000); bs = cfg.pop("bs", 16); lr = cfg.pop("lr", 1e-3)
warm = cfg.pop("warmup", 100); wd = cfg.pop("wd", 0.01); ls = cfg.pop("layer_scale", 0.1); ev = cfg.pop("eval_every", 500)
b2 = cfg.pop("beta2", 0.98)
torch.set_num_threads(cfg.pop("threads", 2)); torch.manual_seed(0)
dims = td.DemoDims(**cfg)
from raylens.checkpoints.tokenizer import build_tokenizer
tok = build_tokenizer(td.tokenizer_corpus(), vocab_size=512, template="Hermes-2")
model, tok = build_hf_model(seed=0, tokenizer=tok, layer_scale=ls, **td._model_overrides(dims))
model.to(dev).train()
spec = td.tiling_spec(dims); enc = td.ExampleEncoder(tok, spec, dims.image_tokens_per_tile)
stream = shapes.iter_samples(0, "train")
decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
opt = torch.optim.AdamW([dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)], lr=lr, betas=(0.9, b2))
evs = shapes.held_out_dataset(200, 1)
t0 = time.time(); losses = []
print(name, "params", sum(p.numel() for p in model.parameters()), flush=True)
for step in range(steps):
    batch = {k: v.to(dev) for k, v in enc.batch([next(stream) for _ in range(bs)]).items()}
    for g in opt.param_groups: g["lr"] = td.lr_at(step, steps, lr, warm)
    loss = model(**batch).loss; opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    losses.append(loss.item())
    if (step + 1) % ev == 0:
        model.eval()
        preds = td.caption_images(model, tok, spec, dims.image_tokens_per_tile, [s[0] for s in evs])
        acc = sum(p == c for p, (_, c, _) in zip(preds, evs)) / len(evs)
        sh = sum(p.split(" ")[2:3] == c.split(" ")[2:3] for p, (_, c, _) in zip(preds, evs)) / len(evs)
        model.train()
        print(f"{name} step {step+1} loss {sum(losses[-100:])/100:.4f} acc {acc:.3f} shape_acc {sh:.3f} t {time.time()-t0:.0f}s", flush=True)
