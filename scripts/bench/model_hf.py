"""HF side of scripts/bench_model.sh: transformers LlamaForCausalLM forward + backward with every
weight resident, per decoder layer and for the whole model, for each --attn implementation; the
counterpart of ferry-bench-model.

  layer: model.model.layers[0] on a random input that requires grad, called with the keyword
         arguments the model itself passes it (causal mask, rotary position embeddings: captured
         from a forward that stops at that layer, so sdpa runs is_causal with no mask and eager
         gets the model's additive mask), then backward of a random dy: weight gradients and dx,
         what ferry's block_backward makes;
  model: model(input_ids, labels=input_ids) forward and loss.backward(), pure fp16/bf16 weights
         (no autocast; no grad scaler, which timing does not need).
Gradients are set to None before each run, so backward writes fresh ones rather than adding.
Timed with CUDA events (host clock on the CPU): --warmup runs, then the median. Saved activations:
torch.autograd.graph.saved_tensors_hooks over one extra forward, each storage counted once,
parameters (and at layer level the rotary tables, which all layers share) left out. Peak:
torch.cuda.max_memory_allocated (layer: above what was allocated before the forward, weight
gradients included; model: in all). A run that fails (out of memory, say) is a record with
"ok": false and the reason. One JSON object per line on stdout; --json also writes the list.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrylib as fl  # noqa: E402
import peer_common as pc  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="debug,1b", help="configs/models NAMEs or config.json paths, comma-separated")
    ap.add_argument("--attn", default="sdpa,eager", help="attn_implementation values, comma-separated")
    ap.add_argument("--levels", default="layer,model", help="layer and/or model")
    fl.add_model_bench_args(ap)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="also write the records here as a JSON list")
    a = ap.parse_args()
    for lv in a.levels.split(","):
        if lv not in ("layer", "model"):
            ap.error("--levels takes layer and/or model, got %r" % lv)
    for at in a.attn.split(","):
        if at not in ("sdpa", "eager"):
            ap.error("--attn takes sdpa and/or eager, got %r" % at)
    return a


def build_model(shape, attn, dtype, device, seed):
    import torch
    from transformers import LlamaForCausalLM
    cfg = pc.hf_config(fl.config_path(shape), attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train(), cfg


class _Stop(Exception):
    pass


def layer_kwargs(model, ids):
    """The keyword arguments the model passes its first decoder layer for ids (mask, rotary
    tables, ...), captured by a forward that stops there."""
    import torch
    got = {}

    def hook(_module, args, kwargs):
        got.update(kwargs)
        got.pop("hidden_states", None)
        raise _Stop()

    h = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except _Stop:
        pass
    finally:
        h.remove()
    return got


class Clock:
    """Time points around consecutive phases: CUDA events, or the host clock."""

    def __init__(self, cuda, points):
        import torch
        self.cuda = cuda
        self.ev = [torch.cuda.Event(enable_timing=True) for _ in range(points)] if cuda else [0.0] * points

    def mark(self, i):
        if self.cuda:
            self.ev[i].record()
        else:
            self.ev[i] = time.perf_counter()

    def ms(self, i, j):
        if self.cuda:
            self.ev[j].synchronize()
            return self.ev[i].elapsed_time(self.ev[j])
        return (self.ev[j] - self.ev[i]) * 1e3


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves while fn() runs, less those in `exclude`
    (data pointers). Returns (fn's result, bytes)."""
    import torch
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def first(out):
    return out[0] if isinstance(out, tuple) else out


def bench_layer(a, model, cfg, dtype, device, cuda):
    import torch
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(device)
    kw = layer_kwargs(model, ids)
    x = torch.randn(a.batch, a.seq, cfg.hidden_size, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(a.batch, a.seq, cfg.hidden_size, dtype=dtype, device=device)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in kw.get("position_embeddings") or () if torch.is_tensor(t)}

    y, nbytes = saved_bytes(lambda: first(layer(x, **kw)), exclude)
    y.backward(dy)
    del y
    clock = Clock(cuda, 3)
    fwd, bwd, tot, peak = [], [], [], None
    for it in range(a.warmup + a.iters):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        clock.mark(0)
        y = first(layer(x, **kw))
        clock.mark(1)
        y.backward(dy)
        clock.mark(2)
        del y
        if it < a.warmup:
            continue
        fwd.append(clock.ms(0, 1)), bwd.append(clock.ms(1, 2)), tot.append(clock.ms(0, 2))
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
    return dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd), fwd_bwd_ms=statistics.median(tot),
                saved_bytes=nbytes, peak_bytes=peak, iters=a.iters)


def bench_model(a, model, cfg, device, cuda):
    import torch
    g = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(device)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    out, nbytes = saved_bytes(lambda: model(input_ids=ids, labels=ids), exclude)
    out.loss.backward()
    del out
    clock = Clock(cuda, 3)
    fwd, bwd, tot, peak, loss = [], [], [], None, None
    for it in range(a.warmup + a.model_iters):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        clock.mark(0)
        out = model(input_ids=ids, labels=ids)
        clock.mark(1)
        out.loss.backward()
        clock.mark(2)
        loss = out.loss.item()
        del out
        if it < a.warmup:
            continue
        fwd.append(clock.ms(0, 1)), bwd.append(clock.ms(1, 2)), tot.append(clock.ms(0, 2))
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated())
    model.zero_grad(set_to_none=True)
    return dict(fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd), fwd_bwd_ms=statistics.median(tot),
                saved_bytes=nbytes, peak_bytes=peak, iters=a.model_iters, loss=loss)


def one_line_error(e):
    msg = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, msg[0] if msg else "")[:300]


def main():
    a = parse_args()
    import torch
    import transformers
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        print("model_hf.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dt_name = a.dtype or ("fp16" if cuda else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    records = []
    for shape in a.shapes.split(","):
        for attn in a.attn.split(","):
            model = cfg = None
            try:
                model, cfg = build_model(shape, attn, dtype, device, a.seed)
            except Exception as e:  # noqa: BLE001 (each failure is a row, never the bench's end)
                err = one_line_error(e)
            for level in a.levels.split(","):
                rec = dict(bench="model_hf.py", impl="hf-" + attn, shape=shape, level=level, device=dev_name,
                           dtype=dt_name, batch=a.batch, seq=a.seq, transformers=transformers.__version__,
                           torch=torch.__version__)
                if model is None:
                    rec.update(ok=False, error=err)
                else:
                    rec["layers"] = cfg.num_hidden_layers
                    try:
                        r = (bench_layer(a, model, cfg, dtype, device, cuda) if level == "layer"
                             else bench_model(a, model, cfg, device, cuda))
                        rec.update(ok=True, **r)
                    except Exception as e:  # noqa: BLE001
                        rec.update(ok=False, error=one_line_error(e))
                        if model is not None:
                            model.zero_grad(set_to_none=True)
                print(json.dumps(rec), flush=True)
                records.append(rec)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
