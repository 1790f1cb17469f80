"""End-to-end distillation on real data: scikit-learn's handwritten digits (shipped with the
package, no download).

1. Train a teacher MLP.
2. Train a small student alone (cross-entropy).
3. Train the same student (same seed, same steps) with cross-entropy + kdfast.kd_loss on the logits
   + kdfast.rkd_loss on the penultimate features (the teacher's are wider: RKD compares the
   structure of the two embedding spaces, so the widths need not match).
Prints the three test accuracies and the time per step of the distillation losses, for kdfast and
for the usual eager formulation (F.kl_div/log_softmax and the torchdistill RKD code).

    python examples/distill_digits.py            # well under a minute on 2 CPU cores
    python examples/distill_digits.py --quick    # a few seconds (used by the tests)
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdfast


class MLP(nn.Module):
    def __init__(self, widths):
        super().__init__()
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-2], widths[-1])

    def forward(self, x):
        feats = self.body(x)
        return self.head(feats), feats


def load_data(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return (model(x)[0].argmax(-1) == y).float().mean().item()


def eager_kd(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


def eager_rkd(fs, ft):
    """The torchdistill / RepDistiller RKDLoss formulation (weights 25 and 50)."""
    def pdist(e, eps=1e-12):
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def psi(e):
        d = pdist(e)
        return d / d[d > 0].mean()

    def angles(e):
        u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(u, u.transpose(1, 2)).view(-1)

    return 25 * F.smooth_l1_loss(psi(fs), psi(ft)) + 50 * F.smooth_l1_loss(angles(fs), angles(ft))


def train(model, data, steps, batch, seed, teacher=None, T=4.0, alpha=0.5, rkd_weight=0.2,
          loss_impl="kdfast"):
    """Returns the cross-entropy loss of the first and last steps, and the mean seconds per step
    spent in the distillation losses (forward + backward through them)."""
    torch.manual_seed(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    loss_time = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        logits, feats = model(x[idx])
        ce = F.cross_entropy(logits, y[idx])
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t_logits, t_feats = teacher(x[idx])
            t0 = time.perf_counter()
            if loss_impl == "kdfast":
                kd = kdfast.kd_loss(logits, t_logits, temperature=T)
                rkd = kdfast.rkd_loss(feats, t_feats)
            else:
                kd = eager_kd(logits, t_logits, T)
                rkd = eager_rkd(feats, t_feats)
            loss_time += time.perf_counter() - t0
            loss = (1 - alpha) * ce + alpha * kd + rkd_weight * rkd
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss.backward()
        # Attribute backward time to the losses only approximately: the MLP's own backward is tiny.
        loss_time += time.perf_counter() - t0 if teacher is not None else 0.0
        opt.step()
        first = ce.item() if first is None else first
        last = ce.item()
    return first, last, loss_time / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer steps, for tests")
    args = p.parse_args(argv)
    steps = 250 if args.quick else args.steps
    train_data, test_data = load_data(args.seed)

    torch.manual_seed(args.seed)
    teacher = MLP([64, 512, 256, 10])
    train(teacher, train_data, steps, args.batch, args.seed)
    teacher.eval()

    def student():
        torch.manual_seed(args.seed + 1)
        return MLP([64, 8, 10])  # about 300x fewer weights than the teacher

    alone = student()
    train(alone, train_data, steps, args.batch, args.seed)
    distilled = student()
    first, last, t_kdfast = train(distilled, train_data, steps, args.batch, args.seed, teacher=teacher)
    # The loss time per step of both implementations, on the same batches (the eager RKD is too
    # slow to train with here: its angle term builds N x N x D and N x N x N tensors).
    timing_steps = 5 if args.quick else 20
    _, _, t_kdfast = train(student(), train_data, timing_steps, args.batch, args.seed, teacher=teacher)
    _, _, t_eager = train(student(), train_data, timing_steps, args.batch, args.seed, teacher=teacher,
                          loss_impl="eager")

    results = {
        "teacher": accuracy(teacher, test_data),
        "student alone": accuracy(alone, test_data),
        "student + kdfast KD + RKD": accuracy(distilled, test_data),
    }
    print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test images, {steps} steps of "
          f"{args.batch}, seed {args.seed}")
    for name, acc in results.items():
        print(f"  test accuracy, {name:<28s} {acc:6.1%}")
    print(f"  distillation loss time per step (forward + backward): kdfast {t_kdfast * 1e3:.2f} ms, "
          f"eager {t_eager * 1e3:.2f} ms ({t_eager / t_kdfast:.1f}x)")
    print(f"  student cross-entropy with kdfast losses: {first:.3f} -> {last:.3f}")
    return {"accuracy": results, "ce_first": first, "ce_last": last, "loss_ms_kdfast": t_kdfast * 1e3,
            "loss_ms_eager": t_eager * 1e3}


if __name__ == "__main__":
    main()
