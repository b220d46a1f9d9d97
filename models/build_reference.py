#!/usr/bin/env python3
"""Build partita's reference models and store them Triton-style.

    models/fraud_gru/config.toml      stateful: (features [B,16], state [B,64]) -> (score [B], new_state [B,64])
    models/fraud_gru/1/model.pt       and its sequence form, forward_sequence: (features [B,S,16], state [B,64])
                                      -> (score [B,S], new_state [B,64]), S <= 64 events of a key in one call
    models/fraud_mlp/config.toml      stateless MLP for benchmarks: features [B,16] -> score [B]
    models/fraud_mlp/1/model.pt

The data is synthetic card transactions. Each card has a typical spend, a home country and usual
merchant categories; a fraudulent event spends far above the card's own recent history (and often
abroad, online, at a risky merchant category). The amount alone is not enough: a big spender's
normal purchase is larger than a small spender's fraud, so the model must learn the card's history
in its recurrent state. That is what makes the state worth keeping per key.

Usage: python models/build_reference.py [--out models] [--epochs N] [--fixtures tests/fixtures/models]
                                        [--weights models/fraud_gru/1/model.pt]
Deterministic: fixed seeds, single-threaded. --weights takes fraud_gru's weights from a model file
instead of training (the shipped weights, with a new export of the code around them), and leaves
fraud_mlp as it is.
"""

import argparse
import math
import os

import torch
from torch import nn

FEATURES = 16
STATE = 64
SEQ_LEN = 24


def synth(n_cards: int, seq_len: int, gen: torch.Generator):
    """Return features [N, T, 16] and labels [N, T] for n_cards sequences of seq_len events."""
    typical = torch.exp(torch.randn(n_cards, 1, generator=gen) * 1.2 + 3.5)  # per-card spend level
    home = torch.randint(0, 10, (n_cards, 1), generator=gen)
    usual_mcc = torch.randint(0, 6, (n_cards, 1), generator=gen)
    fraud = torch.rand(n_cards, seq_len, generator=gen) < 0.05
    fraud[:, :4] = False  # the first events establish the history
    amount = typical * torch.exp(torch.randn(n_cards, seq_len, generator=gen) * 0.35)
    amount = torch.where(fraud, amount * (6 + 20 * torch.rand(n_cards, seq_len, generator=gen)), amount)
    foreign = torch.rand(n_cards, seq_len, generator=gen) < torch.where(fraud, 0.6, 0.05)
    country = torch.where(foreign, (home + 1 + torch.randint(0, 9, (n_cards, seq_len), generator=gen)) % 10, home)
    mcc = torch.where(
        torch.rand(n_cards, seq_len, generator=gen) < torch.where(fraud, 0.7, 0.1),
        torch.randint(6, 8, (n_cards, seq_len), generator=gen),
        usual_mcc.expand(-1, seq_len),
    )
    online = (torch.rand(n_cards, seq_len, generator=gen) < torch.where(fraud, 0.8, 0.3)).float()
    hour = torch.randint(0, 24, (n_cards, seq_len), generator=gen).float()
    gap_days = torch.rand(n_cards, seq_len, generator=gen) * 3

    x = torch.zeros(n_cards, seq_len, FEATURES)
    x[..., 0] = (torch.log1p(amount) - 4.0) / 2.0
    x[..., 1] = torch.sin(hour / 24 * 2 * math.pi)
    x[..., 2] = torch.cos(hour / 24 * 2 * math.pi)
    x[..., 3] = online
    x[..., 4:12] = nn.functional.one_hot(mcc, 8).float()
    x[..., 12] = country.float() / 10.0
    x[..., 13] = torch.log1p(gap_days)
    x[..., 14:16] = torch.randn(n_cards, seq_len, 2, generator=gen) * 0.1
    return x, fraud.float()


class FraudGRU(nn.Module):
    """A GRU cell carries the card's history; an MLP head scores the event against it."""

    def __init__(self, features: int = FEATURES, state: int = STATE):
        super().__init__()
        self.cell = nn.GRUCell(features, state)
        self.head = nn.Sequential(nn.Linear(state + features, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, features: torch.Tensor, state: torch.Tensor):
        context = torch.cat([state, features], dim=1)  # score against the history *before* this event
        score = torch.sigmoid(self.head(context)).squeeze(1)
        new_state = self.cell(features, state)
        return score, new_state

    @torch.jit.export
    def forward_sequence(self, features: torch.Tensor, state: torch.Tensor):
        """A key's backlog in one call: features [B, S, F] -> (score [B, S], new_state [B, H]),
        exactly S calls of forward, one after another, in one TorchScript loop."""
        scores = []
        for t in range(features.shape[1]):
            score, state = self.forward(features[:, t], state)
            scores.append(score)
        return torch.stack(scores, dim=1), state


class FraudMLP(nn.Module):
    """Stateless, larger MLP: the compute-bound model for inference benchmarks."""

    def __init__(self, features: int = FEATURES, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor):
        return torch.sigmoid(self.net(features)).squeeze(1)


def train_gru(epochs: int, gen: torch.Generator) -> FraudGRU:
    model = FraudGRU()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCELoss()
    x, y = synth(4096, SEQ_LEN, gen)
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 256):
            idx = perm[i : i + 256]
            xb, yb = x[idx], y[idx]
            h = torch.zeros(xb.shape[0], STATE)
            loss = 0.0
            for t in range(SEQ_LEN):
                score, h = model(xb[:, t], h)
                loss = loss + loss_fn(score, yb[:, t])
            opt.zero_grad()
            (loss / SEQ_LEN).backward()
            opt.step()
        print(f"fraud_gru epoch {epoch + 1}/{epochs}: loss {float(loss) / SEQ_LEN:.4f}")
    return model


@torch.no_grad()
def evaluate(model: FraudGRU, gen: torch.Generator) -> float:
    """Share of fraud events that score above the 99th percentile of legitimate events."""
    x, y = synth(2048, SEQ_LEN, gen)
    h = torch.zeros(x.shape[0], STATE)
    scores = []
    for t in range(SEQ_LEN):
        s, h = model(x[:, t], h)
        scores.append(s)
    s = torch.stack(scores, 1)[:, 4:].flatten()
    lab = y[:, 4:].flatten()
    threshold = torch.quantile(s[lab == 0], 0.99)
    return float((s[lab == 1] > threshold).float().mean())


GRU_CONFIG = """# Triton-style model configuration, read by partita's model repository loader.
name = "fraud_gru"
platform = "torchscript"
description = "card-fraud scorer: GRU cell over the card's events (state) + MLP head"
max_batch_size = 512

[state]
# Per-key model state: the GRU hidden vector, f32. Stored per card by the state layer.
size = {state}

[[input]]
name = "features"
data_type = "fp32"
dims = [{features}]

[[input]]
name = "state"
data_type = "fp32"
dims = [{state}]

[[output]]
name = "score"
data_type = "fp32"
dims = []

[[output]]
name = "new_state"
data_type = "fp32"
dims = [{state}]

[dynamic_batching]
preferred_batch_size = [64, 256]
max_queue_delay = "1ms"

[warmup]
batch_sizes = [1, 64, 512]

[sequence]
# A key's backlog in one pass: forward_sequence takes up to this many events of one key per row.
max_steps = 64
"""

MLP_CONFIG = """# Triton-style model configuration, read by partita's model repository loader.
name = "fraud_mlp"
platform = "torchscript"
description = "stateless 3x512 MLP, the compute-bound model for inference benchmarks"
max_batch_size = 512

[[input]]
name = "features"
data_type = "fp32"
dims = [{features}]

[[output]]
name = "score"
data_type = "fp32"
dims = []

[dynamic_batching]
preferred_batch_size = [64, 256]
max_queue_delay = "1ms"

[warmup]
batch_sizes = [1, 64, 512]
"""


def save(module: nn.Module, out: str, name: str, config: str) -> None:
    os.makedirs(os.path.join(out, name, "1"), exist_ok=True)
    scripted = torch.jit.script(module.eval())
    scripted.save(os.path.join(out, name, "1", "model.pt"))
    with open(os.path.join(out, name, "config.toml"), "w") as f:
        f.write(config.format(features=FEATURES, state=STATE))
    print(f"wrote {out}/{name}")


class Faulty(nn.Module):
    """Test fixture: the reference shapes, but libtorch raises when a feature is above 1e30."""

    def __init__(self):
        super().__init__()

    def forward(self, features: torch.Tensor, state: torch.Tensor):
        if bool((features > 1e30).any()):
            raise RuntimeError("faulty fixture: feature above 1e30")
        return features.sum(dim=1), state + 1.0


class ShortState(nn.Module):
    """Test fixture: returns a state shorter than its config declares (caught at warm-up)."""

    def __init__(self):
        super().__init__()

    def forward(self, features: torch.Tensor, state: torch.Tensor):
        return features.sum(dim=1), state[:, :1]


def build_fixtures(out: str) -> None:
    """Tiny models for the integration tests, one repository each, under `out`."""
    for name, module in (("faulty", Faulty()), ("short_state", ShortState())):
        # Without the sequence form: the fixtures have only `forward`.
        config = GRU_CONFIG.split("\n[sequence]")[0].replace('name = "fraud_gru"', f'name = "{name}"')
        save(module, os.path.join(out, name), name, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--fixtures", default=None, help="also write the test fixture models under this directory")
    ap.add_argument("--weights", default=None, help="take fraud_gru's weights from this TorchScript file, no training")
    args = ap.parse_args()
    torch.manual_seed(7)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(7)
    if args.weights:
        gru = FraudGRU()
        gru.load_state_dict(torch.jit.load(args.weights).state_dict())
    else:
        gru = train_gru(args.epochs, gen)
    recall = evaluate(gru, torch.Generator().manual_seed(8))
    print(f"fraud_gru: {recall:.1%} of fraud events score above the 99th percentile of legitimate ones")
    save(gru, args.out, "fraud_gru", GRU_CONFIG)
    if not args.weights:  # its random weights come after training's draws: only then the same
        save(FraudMLP(), args.out, "fraud_mlp", MLP_CONFIG)
    if args.fixtures:
        build_fixtures(args.fixtures)


if __name__ == "__main__":
    main()
