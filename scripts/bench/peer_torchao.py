"""Peer "torchao offload": torchao.optim.CPUOffloadOptimizer(offload_gradients=True) wrapping fused
CPU AdamW. fp32 weights stay on the GPU, bf16 autocast (whatever --dtype says: torchao's offload
has no GradScaler support), gradients copied to the host during backward, the CPU step after
backward. It supports neither clipping nor GradScaler, so it runs without them (as in BASELINES.md).
With --grad-accum K > 1: offload_gradients=False (torchao: "not compatible with gradient
accumulation"; its hook copies each micro-batch's accumulated .grad to the host, the last copy
wins), K forward+backward passes (loss / K) into the GPU .grad, one CPU step.
torchao is imported from PYTHONPATH (bench.sh installs .whl/torchao*.whl into a --target dir)."""
import sys

import peer_common as pc


def main():
    args = pc.parse_args(__doc__)

    def body():
        import torch
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError as e:
            raise RuntimeError("torchao is not installed (put its wheel in .whl/; see scripts/bench.sh): %s" % e)
        model, cfg = pc.build_model(args, args.device)
        offload_grads = args.grad_accum == 1
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=offload_grads, lr=args.lr,
                                  weight_decay=args.weight_decay, fused=True)

        def fwd(tok):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=tok, labels=tok).loss

        def step(micro):
            loss = pc.accumulate(micro, fwd)
            opt.step()
            opt.zero_grad()
            return loss

        res = pc.timed_loop(args, step, cfg.vocab_size, args.device)
        import torchao
        res["notes"] = "torchao %s, bf16 autocast, no clip, no GradScaler%s" % (
            torchao.__version__, "" if offload_grads else
            ", grad accumulation %d (offload_gradients=False: it does not support accumulation)" % args.grad_accum)
        return res

    return pc.main_guard(args, body)


if __name__ == "__main__":
    sys.exit(main())
