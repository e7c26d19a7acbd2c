"""A probe, not a recipe: Zoology's whole MQAR training set-up around BaseConv, rebuilt outside mixerlab's model
and trainer, to find which difference from Zoology's runs keeps our gated convolutions on the 1 / (kv pairs)
plateau (README, "Multi-query associative recall").

    python -m benchmarks.zoology_mqar --vocab 256 --layers 2 --minutes 12     # one line per epoch on stdout
    python -m benchmarks.zoology_mqar --vocab 8192 --layers 2 --filter hyena --weight-decay 0.01  # as first run

Written from reading HazyResearch/zoology (model.py, mixers/base_conv.py, mixers/convolution.py, train.py and
the Figure 2 configuration as committed with the figure, 2024-01-11): pre-norm LayerNorm blocks whose Identity
"state mixer" returns norm2 of the stream, which the next block adds to it; embedding dropout 0.1; tied
embeddings; every Linear and the embedding N(0, 0.02) with zero biases; BaseConv ``conv(u) * proj(u) + u`` with
the convolution on the block's input (kernel 3, or the implicit long filter: a ReLU MLP 3 -> 16 -> d of the
position's features, no window, plus a unit skip), kernels alternating 3, -1 over the layers; AdamW (weight
decay 0.1, TrainConfig's default) with a cosine schedule over the epochs, no warm-up, no clipping; a fixed
training set reshuffled every epoch, batch 512, and 3000 test sequences. The data is mixerlab's MQAR generator
(Zoology's layout) with filler between the queries, as Figure 2 sets it; the training and test sets are drawn
from seeds 1234 and 99. Logits are computed only at the query positions, which gives the same loss as the full
LM head with ignored targets. The probe was first written with Hyena's filter for BaseConv's long convolution
(sine MLP, decay window — as mixerlab's `base_conv` had by default until 2026-12-07) and weight decay 0.01;
``--filter hyena --weight-decay 0.01`` runs it that way.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from archs.mixers._filters import Sin
from experiments.tasks.mqar import MQAR


class _ImplicitLongConv(nn.Module):
    """y = h * u + u with h(t) = MLP(t, cos, sin) over l_max positions, t in [0, 1].

    filter="zoology": Zoology's own BaseConv filter (mixers/convolution.py, ImplicitLongConvolution): Linear(3, 16),
    ReLU, Linear(16, d), no window. filter="hyena": Hyena's filter, which this probe first gave BaseConv by mistake
    (mixerlab's `base_conv` had it by default until 2026-12-07, 64 wide with one inner layer): an order-16 MLP with
    sine activations and two inner layers, times an exponential decay exp(-|delta| t) per channel.
    """

    def __init__(self, d: int, l_max: int, filter: str = "zoology", order: int = 16, inner: int = 2):
        super().__init__()
        t = torch.linspace(0, 1, l_max)[:, None]
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float32)[:, None] / l_max
        self.register_buffer("z", torch.cat([t, torch.cos(1e-4 * w), -torch.sin(1e-4 * w)], -1))  # (L, 3)
        self.register_buffer("t", t)
        if filter == "zoology":
            self.mlp = nn.Sequential(nn.Linear(3, order), nn.ReLU(), nn.Linear(order, d))
            decay = torch.zeros(d)
        elif filter == "hyena":
            layers: list[nn.Module] = [nn.Linear(3, order), Sin(order)]
            for _ in range(inner):
                layers += [nn.Linear(order, order), Sin(order)]
            layers.append(nn.Linear(order, d, bias=False))
            self.mlp = nn.Sequential(*layers)
            decay = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d).abs()
        else:
            raise ValueError(f"filter must be 'zoology' or 'hyena', got {filter!r}")
        self.register_buffer("decay", decay)

    def forward(self, u):  # (B, L, D)
        n, L = 2 * u.shape[1], u.shape[1]
        h = self.mlp(self.z[:L]) * torch.exp(-self.t[:L] * self.decay)  # (L, D)
        y = torch.fft.irfft(torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(h, n=n, dim=0), n=n, dim=1)[:, :L]
        return y + u


class _BaseConv(nn.Module):
    def __init__(self, d: int, kernel: int, l_max: int, filter: str = "zoology"):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.kernel = kernel
        self.conv = _ImplicitLongConv(d, l_max, filter) if kernel == -1 else nn.Conv1d(d, d, kernel, groups=d,
                                                                               padding=kernel - 1)

    def forward(self, u):
        if self.kernel == -1:
            return self.conv(u) * self.proj(u) + u
        c = self.conv(u.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2)  # causal: the first L outputs
        return c * self.proj(u) + u


class ZoologyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, l_max: int, embed_dropout: float = 0.1,
                 filter: str = "zoology"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mixers = nn.ModuleList([_BaseConv(d, 3 if i % 2 == 0 else -1, l_max, filter) for i in range(layers)])
        self.norm1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.norm2 = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.norm_f = nn.LayerNorm(d)
        self.drop = nn.Dropout(embed_dropout)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids, where):
        """Logits (N, V) at the N positions ``where`` ((N, 2): batch and time indices)."""
        h, r = self.drop(self.embed(ids)), None
        for mixer, n1, n2 in zip(self.mixers, self.norm1, self.norm2, strict=True):
            r = h if r is None else h + r
            r = mixer(n1(r)) + r
            h = n2(r)  # the Identity state mixer's output, added to the stream by the next block
        x = self.norm_f(h + r)[where[:, 0], where[:, 1]]
        return x @ self.embed.weight.t()


def _examples(task: MQAR, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of n sequences (inputs, targets), drawn 2000 at a time from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    chunks = [task.train_batch(min(2000, n - i), g) for i in range(0, n, 2000)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="BaseConv layers, kernels 3, -1, 3, -1, ...")
    p.add_argument("--lr", type=float, default=2.15e-3, help="Zoology's sweep: 1e-4, 4.6e-4, 2.15e-3, 1e-2")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--train-examples", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.1, help="Zoology's TrainConfig default")
    p.add_argument("--filter", choices=("zoology", "hyena"), default="zoology",
                   help="BaseConv's long filter: Zoology's (ReLU MLP, no window) or Hyena's (sine MLP, decay)")
    p.add_argument("--minutes", type=float, default=math.inf, help="stop after the epoch that passes this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    task = MQAR(vocab_size=a.vocab, seq_len=a.seq_len, num_kv_pairs=a.kv_pairs, random_non_queries=False,
                test_seq_lens=[a.seq_len], test_num_kv_pairs=[a.kv_pairs])
    x_train, y_train = _examples(task, a.train_examples, seed=1234)
    x_test, y_test = _examples(task, 3000, seed=99)
    model = ZoologyLM(a.vocab, a.d_model, a.layers, a.seq_len, filter=a.filter)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs, eta_min=0.0)
    steps = math.ceil(a.train_examples / a.batch)
    print(f"{vars(a)}, {steps} steps per epoch", flush=True)

    def accuracy() -> float:
        model.eval()
        right = total = 0
        with torch.no_grad():
            for i in range(0, len(x_test), 500):
                x, y = x_test[i:i + 500], y_test[i:i + 500]
                where = (y != -100).nonzero()
                right += (model(x, where).argmax(-1) == y[where[:, 0], where[:, 1]]).sum().item()
                total += len(where)
        model.train()
        return right / total

    t0, step = time.time(), 0
    for epoch in range(a.epochs):
        order, loss_sum = torch.randperm(a.train_examples), 0.0
        for i in range(steps):
            idx = order[i * a.batch:(i + 1) * a.batch]
            x, y = x_train[idx], y_train[idx]
            where = (y != -100).nonzero()
            loss = F.cross_entropy(model(x, where), y[where[:, 0], where[:, 1]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, step = loss_sum + loss.item(), step + 1
        acc, minutes = accuracy(), (time.time() - t0) / 60
        print(f"epoch {epoch} step {step} train loss {loss_sum / steps:.3f} test accuracy {acc:.3f} "
              f"lr {sched.get_last_lr()[0]:.2e} {minutes:.1f} min", flush=True)
        if acc > 0.99 or minutes > a.minutes:
            break
        sched.step()


if __name__ == "__main__":
    main()
