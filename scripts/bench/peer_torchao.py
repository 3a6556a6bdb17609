"""Peer "torchao offload": torchao.optim.CPUOffloadOptimizer(offload_gradients=True) wrapping fused
CPU AdamW. fp32 weights stay on the GPU, bf16 autocast (whatever --dtype says: torchao's offload
has no GradScaler support), gradients copied to the host during backward, the CPU step after
backward. It supports neither clipping nor GradScaler, so it runs without them (as in BASELINES.md).
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
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, offload_gradients=True, lr=args.lr,
                                  weight_decay=args.weight_decay, fused=True)

        def step(tok):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tok, labels=tok).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        res = pc.timed_loop(args, step, cfg.vocab_size, args.device)
        import torchao
        res["notes"] = "torchao %s, bf16 autocast, no clip, no GradScaler" % torchao.__version__
        return res

    return pc.main_guard(args, body)


if __name__ == "__main__":
    sys.exit(main())
