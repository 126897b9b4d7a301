"""The local LoRA training step of flotilla-edge, written in PyTorch, for comparison with tch.

The same models, computation and optimiser as common/torch/src/model/:

- a frozen base (Linear or 3x3 Conv layers, each followed by ReLU, and a 2x2 max-pool after each
  convolution);
- LoRA on every base layer, `out + scale * (h @ A^T) @ B^T` (as convolutions for the CNN);
- a trainable head;
- AdamW (weight decay 0) on the LoRA factors and the head only;
- cross-entropy on minibatches drawn by index from 2,048 samples held in one tensor.

Prints one JSON object per (model, rank): the median milliseconds per step over 5 timed runs of 20
steps, after a warm-up run, the protocol of edge-client/benches/steps.rs.

    python3 deploy/bench/steps_pytorch.py [--threads N] [--ranks 2,8,32]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

STEPS = 20
BATCH = 32
SAMPLES = 2048


class LoraModel(torch.nn.Module):
    def __init__(self, kind, dims, classes, rank, scale, side=28):
        super().__init__()
        self.kind, self.scale, self.side = kind, scale, side
        self.base = []  # frozen (weight, bias)
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            if kind == "linear":
                w = torch.randn(d_out, d_in) / d_in**0.5
                a = torch.randn(rank, d_in) / d_in**0.5
            else:
                w = torch.randn(d_out, d_in, 3, 3) / (9 * d_in) ** 0.5
                a = torch.randn(rank, d_in * 9) / (9 * d_in) ** 0.5
            self.base.append((w, torch.zeros(d_out)))
            self.a.append(torch.nn.Parameter(a))
            self.b.append(torch.nn.Parameter(torch.zeros(d_out, rank)))
        features = dims[-1] if kind == "linear" else None
        self.features = features
        self.head_weight = None
        self.head_bias = None
        self.classes = classes

    def build_head(self, features):
        self.head_weight = torch.nn.Parameter(torch.randn(self.classes, features) / features**0.5)
        self.head_bias = torch.nn.Parameter(torch.zeros(self.classes))

    def body(self, x):
        if self.kind == "linear":
            h = x
            for (w, bias), a, b in zip(self.base, self.a, self.b):
                out = F.linear(h, w, bias) + (h @ a.t()) @ b.t() * self.scale
                h = F.relu(out)
            return h
        h = x.view(-1, 1, self.side, self.side)
        for (w, bias), a, b in zip(self.base, self.a, self.b):
            c_out, c_in = w.shape[0], w.shape[1]
            r = a.shape[0]
            out = F.conv2d(h, w, bias, padding=1)
            down = F.conv2d(h, a.view(r, c_in, 3, 3), None, padding=1)
            out = out + F.conv2d(down, b.view(c_out, r, 1, 1)) * self.scale
            h = F.max_pool2d(F.relu(out), 2, 2)
        return h.flatten(1)

    def forward(self, x):
        return F.linear(self.body(x), self.head_weight, self.head_bias)


def make(model, rank):
    if model == "mlp":
        m = LoraModel("linear", [784, 128, 64], 10, rank, 2.0)
        m.build_head(64)
    else:
        # CNN 28x28, conv 16 and 32 channels, then a hidden fully connected layer of 128.
        m = CnnModel(rank)
    return m


class CnnModel(torch.nn.Module):
    """Conv 1→16 and 16→32 (LoRA as convolutions), then Linear 32·7·7 → 128 (LoRA), then the head."""

    def __init__(self, rank):
        super().__init__()
        self.conv = LoraModel("conv", [1, 16, 32], 10, rank, 2.0)
        self.fc = LoraModel("linear", [32 * 7 * 7, 128], 10, rank, 2.0)
        self.fc.build_head(128)

    def forward(self, x):
        return self.fc(self.conv.body(x).flatten(1))


def time_steps(model, data, labels, rank):
    net = make(model, rank)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(3)

    def run():
        for _ in range(STEPS):
            picks = torch.randint(0, SAMPLES, (BATCH,), generator=generator)
            x = data.index_select(0, picks)
            y = labels.index_select(0, picks)
            loss = F.cross_entropy(net(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    run()  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3 / STEPS)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranks", default="2,4,8,16,32,64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    data = torch.randn(SAMPLES, 784)
    labels = torch.randint(0, 10, (SAMPLES,))
    for model in ["mlp", "cnn"]:
        for rank in [int(r) for r in args.ranks.split(",")]:
            ms = time_steps(model, data, labels, rank)
            print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "model": model, "rank": rank,
                              "ms_per_step": round(ms, 4)}), flush=True)


if __name__ == "__main__":
    main()
