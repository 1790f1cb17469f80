"""Tensor-parallel distillation with kdfast.distributed: the teacher's and the student's LM heads are
split by vocabulary across the ranks (column-parallel, as Megatron's ColumnParallelLinear or
PyTorch's ColwiseParallel), and the loss never gathers the logits.

    torchrun --nproc-per-node 2 examples/tp_distill.py              # CPU (gloo)
    torchrun --nproc-per-node 2 examples/tp_distill.py --steps 50   # GPUs: NCCL, one per rank

Each rank holds the whole (small) bodies, the rows start .. stop of both heads' weights, and calls
kdfast.distributed.fused_linear_distill_loss with its head slices: every rank gets the full loss,
its head slice's gradients and the hidden states' full gradient, so the replicated body stays in
step on every rank without any gradient all-reduce of its own. The collectives carry a few numbers
per token, never tokens x vocabulary. At the end rank 0 re-runs the same steps in one process with
the full heads (plain PyTorch) and checks the trained weights agree.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast import distributed as kdd


class TinyLM(nn.Module):
    """Embedding + MLP body; the head is kept apart (a full nn.Linear, split below)."""

    def __init__(self, vocab, width):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, vocab)

    def hidden(self, tokens):
        return self.body(self.embed(tokens))


def build(vocab, seed):
    torch.manual_seed(seed)  # the same on every rank: replicated bodies, one global head to split
    teacher, student = TinyLM(vocab, 64), TinyLM(vocab, 32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def loss_terms(args):
    return dict(divergence=args.divergence, temperature=args.temperature, hard_weight=args.hard_weight,
                soft_weight=1.0, reduction="mean")


def batch(step, args):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[:, : args.seq // 4] = -100  # a prompt: not trained on
    return tokens[:, :-1], labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=1001)  # not a multiple of 2: uneven slices
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--divergence", default="jsd")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--hard-weight", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    teacher, student = build(args.vocab, 0)
    teacher.to(device), student.to(device)
    start, stop = kdd.vocab_range(args.vocab, rank=rank)
    # this rank's slices of the two heads (column-parallel: rows of nn.Linear.weight)
    s_w = nn.Parameter(student.head.weight.detach()[start:stop].clone())
    s_b = nn.Parameter(student.head.bias.detach()[start:stop].clone())
    t_w, t_b = teacher.head.weight[start:stop], teacher.head.bias[start:stop]
    params = list(student.embed.parameters()) + list(student.body.parameters()) + [s_w, s_b]
    opt = torch.optim.SGD(params, lr=args.lr)
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), vocabulary {args.vocab}: rank 0 holds ids {start}..{stop}")

    for step in range(1, args.steps + 1):
        tokens, labels = (x.to(device) for x in batch(step, args))
        with torch.no_grad():
            h_t = teacher.hidden(tokens)
        h_s = student.hidden(tokens)
        loss = kdd.fused_linear_distill_loss(h_s, s_w, h_t, t_w, student_bias=s_b, teacher_bias=t_b,
                                             labels=labels, **loss_terms(args))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step == 1 or step % 5 == 0 or step == args.steps):
            print(f"step {step}: loss {loss.item():.5f}")

    # gather the trained head slices (only for the check below) and compare on rank 0
    # (padded to the largest slice: all_gather takes equal sizes)
    width = -(-args.vocab // world)
    mine = torch.zeros((width, s_w.shape[1]), device=device)
    mine[: stop - start] = s_w.detach()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    if rank == 0:
        head = torch.cat([p[: b - a] for p, (a, b) in
                          zip(parts, (kdd.vocab_range(args.vocab, rank=r) for r in range(world)))])
        err = check_single_process(args, device, head, student)
        print(f"trained weights: distributed run matches single-process run (max abs difference {err:.2e})")
    dist.destroy_process_group()


def check_single_process(args, device, head_weight, tp_student):
    """The same steps in one process with the full heads and plain PyTorch losses."""
    teacher, student = build(args.vocab, 0)
    teacher.to(device), student.to(device)
    opt = torch.optim.SGD(student.parameters(), lr=args.lr)
    T = args.temperature
    for step in range(1, args.steps + 1):
        tokens, labels = (x.to(device) for x in batch(step, args))
        with torch.no_grad():
            zt = teacher.head(teacher.hidden(tokens)).flatten(0, 1)
        zs = student.head(student.hidden(tokens)).flatten(0, 1)
        keep = labels.flatten() != -100
        soft = kdfast.reference.divergence_rows(zs, zt, T, args.divergence, 0.5 if args.divergence == "jsd" else 0.1,
                                                keep)
        hard = F.cross_entropy(zs, labels.flatten(), ignore_index=-100, reduction="none")
        loss = (soft + args.hard_weight * hard)[keep].sum() / keep.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (student.head.weight.detach() - head_weight).abs().max()
    for p, q in zip(student.body.parameters(), tp_student.body.parameters()):
        err = torch.maximum(err, (p.detach() - q.detach()).abs().max())
    tol = 1e-4
    if not err <= tol:
        raise SystemExit(f"the distributed run differs from the single-process run by {err.item():.3e} > {tol}")
    return err.item()


if __name__ == "__main__":
    main()
