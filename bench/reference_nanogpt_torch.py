"""The reference for experiment=shakespeare_char_cpu: nanoGPT's CPU "baby" recipe, in PyTorch.

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python bench/reference_nanogpt_torch.py [--seeds 0 1 2]

Not part of `make bench` (PyTorch is not a chainrule dependency): it exists so the recipe's
figure is compared with the reference on the same machine rather than with a number quoted from
elsewhere. Written after nanoGPT's model.py and train.py as run by its README's command

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(no biases, tied embeddings, GELU MLP, scaled c_proj init, AdamW β=(0.9, 0.99), weight decay 0.1
on matrices, clip 1.0, warmup 100 then cosine 1e-3 -> 1e-4). The final model is scored twice:
nanoGPT's own estimate (20 random validation batches) and chainrule's validation set (50
batches of 12 non-overlapping windows evenly spaced over the last 10%), so the two frameworks
are compared on the same characters.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
MAX_ITERS, WARMUP, LR, MIN_LR = 2000, 100, 1e-3, 1e-4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
                   for z in self.c_attn(x).split(N_EMBD, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.attn = Attention()
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lr_at(it):
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (MAX_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def run(text: str, seed: int) -> dict:
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(len(data) * 0.9)
    train, val = torch.from_numpy(data[:n]), torch.from_numpy(data[n:])
    torch.manual_seed(1337 + seed)

    def batch(split):
        ix = torch.randint(len(split) - BLOCK, (BATCH,))
        return (torch.stack([split[i:i + BLOCK] for i in ix]),
                torch.stack([split[i + 1:i + 1 + BLOCK] for i in ix]))

    model = GPT(len(chars))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    x, y = batch(train)
    t0 = time.perf_counter()
    for it in range(MAX_ITERS):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(x, y)
        x, y = batch(train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        nanogpt_val = statistics.fmean(model(*batch(val)).item() for _ in range(20))
        window = BLOCK + 1  # chainrule's validation set: 600 evenly spaced windows
        slots, needed = len(val) // window, 50 * BATCH
        starts = (np.arange(needed) * slots // needed) * window
        windows = torch.from_numpy(data[n:][starts[:, None] + np.arange(window)])
        chainrule_val = statistics.fmean(
            model(w[:, :-1], w[:, 1:]).item() for w in windows.split(BATCH))
    return {"seed": seed, "train_s": train_s, "val_loss_nanogpt_estimate": nanogpt_val,
            "val_loss_chainrule_windows": chainrule_val}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data" / "tinyshakespeare" / "input.txt"))
    args = parser.parse_args()
    text = Path(args.data).read_text()
    print(f"[torch {torch.__version__}, {torch.get_num_threads()} threads]")
    runs = []
    for seed in args.seeds:
        r = run(text, seed)
        runs.append(r)
        print(f"seed {seed}: training {r['train_s']:.0f} s, val loss "
              f"{r['val_loss_nanogpt_estimate']:.4f} (nanoGPT's 20 random batches), "
              f"{r['val_loss_chainrule_windows']:.4f} (chainrule's validation windows)",
              flush=True)
    medians = {f"median_{k}": statistics.median(r[k] for r in runs)
               for k in ("train_s", "val_loss_nanogpt_estimate", "val_loss_chainrule_windows")}
    print(json.dumps(medians))
    out = Path(__file__).resolve().parent / "results" / "nanogpt_reference.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "runs": runs, **medians}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(main())
