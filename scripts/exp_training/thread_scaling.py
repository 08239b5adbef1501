"""Seconds per classifier training step on N threads (`thread_scaling.py 2`, `thread_scaling.py 1 64`)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from torch import nn
from training.models import build_demo_classifier
threads = int(sys.argv[1]); bs = int(sys.argv[2]) if len(sys.argv) > 2 else 64
torch.set_num_threads(threads); torch.manual_seed(0)
m = build_demo_classifier(6).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), 1e-3)
x = torch.randn(bs, 3, 64, 64).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 6, (bs,))
def step():
    loss = nn.functional.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5): step()
t = time.perf_counter(); n = 30
for _ in range(n): step()
print(f"threads {threads} bs {bs}: {(time.perf_counter()-t)/n*1000:.0f} ms/step", flush=True)
