"""Peer "FSDP2 CPU offload": PyTorch FSDP2 fully_shard per decoder layer and on the root with
CPUOffloadPolicy(pin_memory=True) and MixedPrecisionPolicy(param_dtype=fp16|bf16, reduce fp32),
world size 1 (single-process init from environment variables) or, under torchrun
(python -m torch.distributed.run --nproc-per-node N, scripts/bench.sh --gpus), N ranks with one
GPU each (LOCAL_RANK; NCCL for the GPU tensors, Gloo for the CPU ones), CPU AdamW after backward,
clip_grad_norm_ 1.0, and for fp16 the ShardedGradScaler (dropped, with a note, if it fails).
With --grad-accum K: K forward+backward passes (loss / K, scaled); FSDP2's default gradient sync
on every micro-batch, so each backward's sharded gradient is offloaded and summed into the CPU
.grad (no set_requires_gradient_sync(False): that keeps the unsharded gradients on the GPU,
which the offload is there to avoid); then one unscale_, clip, CPU AdamW step.
With N ranks every rank draws its own tokens (--seed + rank; the model's init uses --seed on all),
rank 0 writes --json and rank r > 0 writes --json's name with .rank<r> before .json (its peaks);
tokens_per_s is rank 0's (one rank's batch), global_tokens_per_s N times it."""
import os
import socket
import sys

import peer_common as pc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = pc.parse_args(__doc__)

    def body():
        import torch
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        cuda = args.device.startswith("cuda")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
        try:
            model, cfg = pc.build_model(args, "cuda" if cuda else args.device)
            mp = MixedPrecisionPolicy(param_dtype=pc.half(args), reduce_dtype=torch.float32)
            kw = dict(mp_policy=mp)
            if cuda:
                kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
            for layer in model.model.layers:
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
            if cuda:
                torch.cuda.empty_cache()
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            scaler = None
            notes = []
            if args.dtype == "fp16" and cuda:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                scaler = ShardedGradScaler()

            def fwd(tok):
                return model(input_ids=tok, labels=tok).loss

            def step(micro):
                nonlocal scaler
                if scaler is not None:
                    try:
                        loss = pc.accumulate(micro, fwd, scaler.scale)
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                        scaler.step(opt)
                        scaler.update()
                        opt.zero_grad(set_to_none=True)
                        return loss
                    except RuntimeError as e:
                        notes.append("ShardedGradScaler failed (%s); ran without it" % str(e).splitlines()[0][:120])
                        scaler = None
                        opt.zero_grad(set_to_none=True)
                        pc.restart_step()
                loss = pc.accumulate(micro, fwd)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            model_seed = args.seed
            args.seed = model_seed + rank   # each rank's own tokens (the model was built with model_seed)
            res = pc.timed_loop(args, step, cfg.vocab_size, "cuda" if cuda else args.device)
            args.seed = model_seed
            res.update(rank=rank, world=world, global_tokens_per_s=res["tokens_per_s"] * world)
            notes.insert(0, "fully_shard per layer, %sMixedPrecision %s, CPU AdamW, clip %g%s%s" % (
                "CPUOffloadPolicy(pin_memory=True), " if cuda else "", args.dtype, args.clip,
                ", ShardedGradScaler" if scaler is not None else "",
                ", grad accumulation %d (gradient sync per micro-batch)" % args.grad_accum if args.grad_accum > 1 else ""))
            res["notes"] = "; ".join(notes)
            return res
        finally:
            dist.destroy_process_group()

    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        stem = args.json[:-5] if args.json.endswith(".json") else args.json
        args.json = "%s.rank%d.json" % (stem, rank)
    return pc.main_guard(args, body)


if __name__ == "__main__":
    sys.exit(main())
