"""SurgeryCLIP speed and memory against a straightforward CLIP Surgery that materialises both attention matrices.

The peer follows the reference implementation: in each surgery block it forms softmax(q·kᵀ/√d) and
softmax(v·vᵀ/√d) as [B, h, N, N] tensors, applies each to v and projects each separately. Both
implementations share one randomly initialised ViT (no download) and give the same tokens (checked).
Prints images/s and peak memory per input size, and ours/peer ratios.

    python benchmarks/surgeryclip.py                       # ViT-B/16, 224², 448², 640×480 (480 high)
    python benchmarks/surgeryclip.py --train               # forward + backward
    python benchmarks/surgeryclip.py --layers 4 --sizes 224x224   # quick
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

from surgdino.modeling.backbone.surgeryclip import SurgeryCLIP
from surgdino.modeling.backbone.surgeryclip_checkpoint import CLIPArch


def naive_all_tokens(model: SurgeryCLIP, images: torch.Tensor) -> torch.Tensor:
    """The reference algorithm with explicit attention matrices; same weights, same output as encode_image_with_all_tokens."""
    v_ = model.visual
    b = images.shape[0]
    x = v_.conv1(images).flatten(2).transpose(1, 2)  # [B, N, C]
    gh, gw = v_.token_grid(*images.shape[-2:])
    x = torch.cat([v_.class_embedding.expand(b, 1, -1), x], dim=1) + v_.pos_embed(gh, gw)
    x = v_.ln_pre(x)
    surgery_x = None
    for block in v_.transformer.resblocks:
        attn = block.attn
        n, c = x.shape[1], x.shape[2]
        heads = attn.heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        scale = 1 / math.sqrt(c // heads)
        attn_ori = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)  # [B, h, N, N]
        x_ori = attn.out_proj((attn_ori @ v).transpose(1, 2).reshape(b, n, c))
        if block.surgery:
            attn_vv = torch.softmax(v @ v.transpose(-2, -1) * scale, dim=-1)  # [B, h, N, N]
            x_vv = attn.out_proj((attn_vv @ v).transpose(1, 2).reshape(b, n, c))
            surgery_x = (x if surgery_x is None else surgery_x) + x_vv
        x = x + x_ori
        x = x + block.mlp(block.ln_2(x))
    if surgery_x is None:
        return x
    return torch.cat([x[:, :1], surgery_x[:, 1:]], dim=1)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def build(args: argparse.Namespace) -> SurgeryCLIP:
    torch.manual_seed(0)
    arch = CLIPArch(width=args.width, layers=args.layers, heads=args.width // 64, mlp_width=4 * args.width,
                    patch_size=args.patch, grid_size=224 // args.patch, output_dim=512)
    model = SurgeryCLIP(arch, surgery_depth=args.surgery_depth, text=False).to(args.device)
    return model.train(args.train).requires_grad_(args.train)


def run_one(args: argparse.Namespace, impl: str, size: tuple[int, int]) -> tuple[float, float]:
    """In a fresh process: (images/s, best of ``repeats``; peak memory MiB of one step above the idle model)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    fn = model.encode_image_with_all_tokens if impl == "ours" else (lambda x: naive_all_tokens(model, x))
    images = torch.randn(args.batch_size, 3, *size, device=args.device)
    dev = images.device

    def step() -> None:
        if args.train:
            fn(images).square().mean().backward()
        else:
            with torch.no_grad():
                fn(images)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # memory first, in a process that has not run anything yet: the peak of one step above the idle model
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        base = _status_kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (VmHWM)
            f.write("5")
        step()
        peak = (_status_kb("VmHWM:") - base) * 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return args.batch_size / min(times), peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--surgery-depth", type=int, default=6)
    p.add_argument("--sizes", nargs="+", default=["224x224", "448x448", "480x640"], help="HxW")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (the best one counts)")
    p.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    model = build(args)
    print(f"ViT width {args.width}, {args.layers} blocks, patch {args.patch}, surgery depth {args.surgery_depth}, "
          f"batch {args.batch_size}, {'train (fwd+bwd)' if args.train else 'inference'}, device {args.device}, "
          f"threads {args.threads or torch.get_num_threads()}")
    print(f"{'size':>9} {'tokens':>6} | {'ours img/s':>10} {'peer img/s':>10} {'speed ×':>7} | "
          f"{'ours MiB':>8} {'peer MiB':>8} {'memory ×':>8} | max |Δ|")
    for text in args.sizes:
        size = tuple(int(v) for v in text.lower().split("x"))
        with torch.no_grad():  # same tokens from both
            images = torch.randn(1, 3, *size, device=args.device)
            diff = (model.encode_image_with_all_tokens(images) - naive_all_tokens(model, images)).abs().max().item()
        with ctx.Pool(1) as pool:
            ours_ips, ours_mem = pool.apply(run_one, (args, "ours", size))
        with ctx.Pool(1) as pool:
            peer_ips, peer_mem = pool.apply(run_one, (args, "peer", size))
        n = -(-size[0] // args.patch) * -(-size[1] // args.patch)
        print(f"{text:>9} {n:>6} | {ours_ips:10.2f} {peer_ips:10.2f} {ours_ips / peer_ips:7.2f} | "
              f"{ours_mem:8.0f} {peer_mem:8.0f} {peer_mem / max(ours_mem, 1e-6):8.2f} | {diff:.1e}", flush=True)
    print("speed × = ours/peer images per second (higher is better); memory × = peer/ours peak memory of one step "
          "(higher is better)")


if __name__ == "__main__":
    main()
