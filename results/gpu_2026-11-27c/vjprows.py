"""K row VJPs through BDL's net: K sequential autograd.grad calls vs one vmap-batched call (is_grads_batched)."""
import sys, time, statistics
import torch
from fusion.nets import create_fusion_net

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
size, batch, K = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (256, 8, 3)
cl = "cl" in sys.argv
torch.manual_seed(0)
net = create_fusion_net("bdl").to(dev)
if cl:
    net = net.to(memory_format=torch.channels_last)
x = list(net.parameters())
amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
def inputs(seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=g).to(dev), torch.rand(batch, 3, size, size, generator=g).to(dev)
INPUTS = {s: inputs(s) for s in (0, 1, 2)}
def fwd(seed):
    with amp:
        return net(*INPUTS[seed])
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
shape = fwd(0).shape
us = [[torch.randn(shape, device=dev) for _ in range(2)] for _ in range(K)]
def sequential():
    zs = [fwd(1), fwd(2)]
    rows = []
    for i in range(K):
        rows.append(torch.autograd.grad(zs, x, [u.to(z.dtype) for z, u in zip(zs, us[i])], retain_graph=i < K - 1, allow_unused=True))
    return rows
def batched():
    zs = [fwd(1), fwd(2)]
    cot = [torch.stack([us[i][s] for i in range(K)]).to(zs[s].dtype) for s in range(2)]
    g = torch.autograd.grad(zs, x, cot, is_grads_batched=True, allow_unused=True)
    return [tuple(None if t is None else t[i] for t in g) for i in range(K)]
def concatenated():
    """BDL's net has no batch norm: one forward over the LL and UL batches together, one VJP per row."""
    with amp:
        z = net(torch.cat([INPUTS[1][0], INPUTS[2][0]]), torch.cat([INPUTS[1][1], INPUTS[2][1]]))
    rows = []
    for i in range(K):
        u = torch.cat(us[i]).to(z.dtype)
        rows.append(torch.autograd.grad(z, x, u, retain_graph=i < K - 1, allow_unused=True))
    return rows
c = concatenated()
a, b = sequential(), batched()
errc = max(float((p - q).abs().max() / (q.abs().max() + 1e-30)) for ra, rb in zip(c, a) for p, q in zip(ra, rb) if p is not None)
print(f"max rel diff concatenated vs sequential {errc:.2e}")
err = max(float((p - q).abs().max() / (q.abs().max() + 1e-30)) for ra, rb in zip(a, b) for p, q in zip(ra, rb) if p is not None)
print(f"device {dev}, {size}px batch {batch} K={K} {'channels_last' if cl else 'NCHW'}: max rel diff batched vs sequential {err:.2e}")
VARIANTS = (("sequential", sequential), ("batched", batched), ("concatenated", concatenated))
times = {name: [] for name, _ in VARIANTS}
for _ in range(2):
    for _, fn in VARIANTS:
        fn()
for _ in range(6):
    for name, fn in VARIANTS:
        sync(); t0 = time.perf_counter(); fn(); sync(); times[name].append(time.perf_counter() - t0)
for name, t in times.items():
    print(f"{name}: median {1e3 * statistics.median(t):.1f} ms, min {1e3 * min(t):.1f} ms (2 forwards + {K} row VJPs)")
if dev.type == "cuda":
    for name, fn in VARIANTS:
        torch.cuda.reset_peak_memory_stats(); fn(); sync()
        print(f"{name}: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
