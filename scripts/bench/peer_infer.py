"""Inference peers (BASELINES.md): HF LlamaForCausalLM in fp16/bf16 with weights resident on the
GPU, or wrapped by accelerate's cpu_offload (each module copied in on use, no prefetch).
  --job forward:  one forward pass of (batch, seq) random tokens, median of --reps after warm-up
  --job generate: greedy HF generate, prompt --prompt tokens, --new new tokens, tokens/s
Writes {"ok", "ms", "peak_alloc", "tok_s"} to --json."""
import argparse
import statistics
import sys
import time

import peer_common as pc


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["resident", "cpu_offload"], default="resident")
    ap.add_argument("--job", choices=["forward", "generate"], default="forward")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    def body():
        import torch
        from transformers import LlamaForCausalLM
        torch.manual_seed(args.seed)
        cfg = pc.hf_config(args.config)
        cfg.use_cache = args.job == "generate"
        dt = pc.half(args)
        if args.mode == "resident":
            with torch.device("cuda"):
                model = LlamaForCausalLM(cfg).to(dt).eval()
        else:
            from accelerate import cpu_offload
            model = LlamaForCausalLM(cfg).to(dt).eval()
            cpu_offload(model, execution_device=torch.device("cuda"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(args.seed)
        times, res = [], dict(ok=True)
        with torch.no_grad():
            for i in range(args.reps + 1):
                if args.job == "forward":
                    tok = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).cuda()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(input_ids=tok)
                else:
                    tok = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=g).cuda()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model.generate(input_ids=tok, attention_mask=torch.ones_like(tok), max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                if i:
                    times.append((time.perf_counter() - t0) * 1e3)
        res["ms"] = statistics.median(times)
        res["peak_alloc"] = torch.cuda.max_memory_allocated()
        if args.job == "generate":
            res["tok_s"] = args.batch * args.new / (res["ms"] / 1e3)
        return res

    return pc.main_guard(args, body)


if __name__ == "__main__":
    sys.exit(main())
