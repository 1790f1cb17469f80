"""Distil a small transformer language model into a smaller one with kdfast's fused linear head.

The corpus is real English text available offline: the Python documentation topics shipped with
the standard library (pydoc_data.topics, about 0.5 MB), split into words and punctuation, with a
vocabulary of the most frequent words (the rest map to <unk>).

1. Train the teacher (randomly initialised, 3 layers, width 192) with cross-entropy for a few steps,
   so that it has something to teach.
2. Distil it into a randomly initialised student (2 layers, width 128) with
   kdfast.nn.FusedLinearDistillLoss: the loss takes both models' final hidden states and LM head
   weights, never the (tokens x V) logits, and mixes the JSD to the teacher (temperature 2) with the
   hard cross-entropy of the next token.
Prints the losses and tokens/s.

    python examples/distill_lm.py                  # under a minute on 2 CPU cores
    python examples/distill_lm.py --steps 5 --teacher-steps 5    # seconds (used by the tests)
"""
import argparse
import collections
import math
import re
import time

import torch
from torch import nn

import kdfast


def load_corpus(vocab_size):
    import pydoc_data.topics
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    common = [w for w, _ in collections.Counter(words).most_common(vocab_size - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0 is <unk>
    return torch.tensor([index.get(w, 0) for w in words], dtype=torch.long)


class TinyLM(nn.Module):
    """A pre-norm causal transformer; forward returns the final hidden states (the LM head is
    applied by the loss)."""

    def __init__(self, vocab, width, layers, heads, context):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed(ids) + self.pos[:T]
        return self.norm(self.blocks(x, mask=self.causal[:T, :T], is_causal=True))


def batches(tokens, batch, context, generator):
    while True:
        starts = torch.randint(0, tokens.numel() - context - 1, (batch,), generator=generator)
        seq = torch.stack([tokens[s:s + context + 1] for s in starts])
        yield seq[:, :-1], seq[:, 1:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="distillation steps")
    ap.add_argument("--teacher-steps", type=int, default=40, help="teacher pre-training steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--divergence", default="jsd", choices=["kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tokens = load_corpus(args.vocab)
    data = batches(tokens, args.batch, args.context, torch.Generator().manual_seed(args.seed))
    print(f"corpus: {tokens.numel()} tokens (Python's pydoc topics), vocabulary {args.vocab}")

    teacher = TinyLM(args.vocab, 192, 3, 4, args.context)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(args.teacher_steps):
        x, y = next(data)
        h = teacher(x)
        # hard loss alone: the teacher's own head on both sides, soft_weight 0
        loss = kdfast.fused_linear_distill_loss(h, teacher.lm_head.weight, h.detach(), teacher.lm_head.weight.detach(),
                                                labels=y, hard_weight=1.0, soft_weight=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.teacher_steps - 1:
            print(f"teacher step {step:3d}  cross-entropy {loss.item():.3f}")
    teacher_s = time.perf_counter() - t0
    teacher.eval().requires_grad_(False)

    student = TinyLM(args.vocab, 128, 2, 4, args.context)
    loss_fn = kdfast.nn.FusedLinearDistillLoss(divergence=args.divergence, temperature=2.0, hard_weight=0.5,
                                               soft_weight=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    history = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = next(data)
        with torch.no_grad():
            ht = teacher(x)
        loss = loss_fn(student(x), student.lm_head.weight, ht, teacher.lm_head.weight, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"student step {step:3d}  0.5 CE + {args.divergence} {loss.item():.3f}")
    student_s = time.perf_counter() - t0
    per_step = args.batch * args.context
    out = {
        "loss_first": history[0], "loss_last": history[-1], "losses": history,
        "teacher_tokens_per_s": args.teacher_steps * per_step / teacher_s if args.teacher_steps else math.nan,
        "distill_tokens_per_s": args.steps * per_step / student_s,
    }
    print(f"teacher training {out['teacher_tokens_per_s']:.0f} tokens/s; distillation "
          f"{out['distill_tokens_per_s']:.0f} tokens/s (teacher forward + student step)")
    return out


if __name__ == "__main__":
    main()
