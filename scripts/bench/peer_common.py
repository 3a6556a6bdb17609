"""Shared by the peer scripts (peer_*.py): arguments, the HF model, random tokens, the timed loop,
gradient accumulation.

Every peer is one process that writes one JSON object to --json: either
  {"ok": true, "step_ms": median after warm-up, "steps_ms": [...], "peak_alloc": bytes,
   "peak_reserved": bytes, "losses": [...], "grad_accum": K, "backward_per_step": K,
   "tokens_per_s": K x batch x seq / step time, "notes": "..."}
or {"ok": false, "error": "..."}; the driver (bench.py) turns either into a table row.
Setup as in ../../../shared/BASELINES.md: LLaMA shapes, batch 1, random tokens, AdamW lr 1e-5,
weight decay 0.01, clip 1.0 (where the peer supports it), median step after warm-up.
Gradient accumulation (--grad-accum K, issue 19): one optimizer step = K micro-batches of
--batch sequences, each forward + backward of its mean loss divided by K (so the gradient is
that of the mean over all K x batch x seq tokens, as ferry's grad_accum), then the peer's
unscale / clip / optimizer step once. accumulate() does the micro-batches and counts the
backward passes that really ran (a hook on each scaled loss); timed_loop fails the run unless
every step ran exactly K of them.
"""
import argparse
import json
import statistics
import sys
import time
import traceback

import ferrylib as fl


def parse_args(desc):
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--config", required=True, help="HF config.json of the shape (configs/models/NAME.json)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script itself")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", required=True, help="where the result object goes")
    args = ap.parse_args()
    if args.grad_accum < 1:
        ap.error("--grad-accum must be at least 1")
    return args


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def hf_config(path, attn="sdpa"):
    """The config.json at `path` as a LlamaConfig without KV cache, with attention `attn`."""
    from transformers import LlamaConfig
    d = fl.hf_config_dict(path)
    d["use_cache"] = False
    cfg = LlamaConfig(**d)
    cfg._attn_implementation = attn
    return cfg


def build_model(args, device):
    """fp32 LlamaForCausalLM with sdpa attention, initialised directly on `device`."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(args.seed)
    cfg = hf_config(args.config)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.float().train(), cfg


def half(args):
    import torch
    return torch.float16 if args.dtype == "fp16" else torch.bfloat16


_backward_passes = [0]   # backward passes run through accumulate(), ever
_step_start = [0]        # the count when the current step (or its restart) began


def accumulate(micro, loss_fn, scale=None):
    """Forward + backward of every micro-batch in `micro` (token tensors): loss_fn(tokens) -> mean
    loss of that micro-batch; backward of loss / len(micro), through scale(x) (e.g. a GradScaler's
    scale) when given. Gradients add up in .grad (or wherever the peer's hooks put them); the
    caller then steps the optimizer once. Returns the mean loss over the micro-batches (detached)."""
    k = len(micro)
    total = None
    for tok in micro:
        loss = loss_fn(tok)
        part = loss / k
        if scale is not None:
            part = scale(part)
        part.register_hook(_count_backward)
        part.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total / k


def restart_step():
    """The current step starts over (a peer's fallback re-running it): backward passes counted so
    far in this step do not count towards its --grad-accum."""
    _step_start[0] = _backward_passes[0]


def _count_backward(grad):
    _backward_passes[0] += 1
    return grad


def timed_loop(args, step_fn, vocab, device):
    """Runs warmup + steps calls of step_fn(micro) -> loss tensor, `micro` being --grad-accum
    token tensors of --batch x --seq on `device`; returns the result object. Each step must run
    exactly --grad-accum backward passes through accumulate() (raises otherwise)."""
    import torch
    cuda = device.startswith("cuda")
    g = torch.Generator().manual_seed(args.seed)
    k = args.grad_accum
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        micro = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(k)]
        if cuda:
            torch.cuda.synchronize()
        _step_start[0] = _backward_passes[0]
        t0 = time.perf_counter()
        loss = step_fn(micro)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        n_bwd = _backward_passes[0] - _step_start[0]
        if n_bwd != k:
            raise RuntimeError("step %d ran %d backward passes, expected --grad-accum %d" % (i + 1, n_bwd, k))
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
        print("step %d: %.1f ms, loss %.4f, %d backward pass%s" % (i + 1, dt, losses[-1], n_bwd,
                                                                   "" if n_bwd == 1 else "es"), flush=True)
    step_ms = statistics.median(times)
    res = dict(ok=True, step_ms=step_ms, steps_ms=times, losses=losses, grad_accum=k, backward_per_step=k,
               tokens_per_s=k * args.batch * args.seq / (step_ms / 1e3))
    if cuda:
        res["peak_alloc"] = torch.cuda.max_memory_allocated()
        res["peak_reserved"] = torch.cuda.max_memory_reserved()
        res["card"] = torch.cuda.get_device_name()
    else:
        res["peak_alloc"] = res["peak_reserved"] = 0
    return res


def main_guard(args, body):
    """Runs body() -> result dict; any exception becomes {"ok": false, "error": ...}, exit 1."""
    try:
        res = body()
        write(args.json, res)
        return 0
    except Exception as e:  # the row must say why, whatever went wrong
        traceback.print_exc()
        msg = "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        if "out of memory" in str(e).lower():
            msg = "out of GPU memory: " + msg
        write(args.json, dict(ok=False, error=msg[:400]))
        return 1


if __name__ == "__main__":
    sys.exit("import this module from a peer_*.py script")
