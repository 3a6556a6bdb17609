"""Peer "PyTorch AMP (no offload)": HF LlamaForCausalLM (sdpa) with fp32 weights on the GPU,
autocast to fp16/bf16, GradScaler (fp16 only), fused GPU AdamW, clip_grad_norm_ 1.0. With
--grad-accum K: K forward+backward passes (loss / K, scaled) accumulate into .grad, then one
unscale_, clip, scaler.step and update."""
import sys

import peer_common as pc


def main():
    args = pc.parse_args(__doc__)

    def body():
        import torch
        model, cfg = pc.build_model(args, args.device)
        fused = args.device.startswith("cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused)
        use_scaler = args.dtype == "fp16" and fused
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        dev_type = "cuda" if fused else "cpu"

        def fwd(tok):
            with torch.autocast(dev_type, dtype=pc.half(args)):
                return model(input_ids=tok, labels=tok).loss

        def step(micro):
            loss = pc.accumulate(micro, fwd, scaler.scale)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss

        res = pc.timed_loop(args, step, cfg.vocab_size, args.device)
        res["notes"] = "fp32 weights, autocast %s%s, fused AdamW, clip %g%s" % (
            args.dtype, " + GradScaler" if use_scaler else "", args.clip,
            ", grad accumulation %d" % args.grad_accum if args.grad_accum > 1 else "")
        return res

    return pc.main_guard(args, body)


if __name__ == "__main__":
    sys.exit(main())
