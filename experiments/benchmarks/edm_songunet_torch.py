r"""The PyTorch side of ``edm_side_by_side.py``: EDM's ``SongUNet`` timed on one configuration.

Run by a Python with torch (not this project's); it imports ``training.networks`` from the
folder ``--edm`` (EDM's public repository: ``training/``, ``torch_utils/``, ``dnnlib/``),
builds ``SongUNet(**json.loads(--network))`` and times, with ``--threads`` threads:

- the forward pass, ``net.eval()`` under ``torch.inference_mode()``;
- a training step, ``net.train()`` (dropout on): the VP noise-prediction loss of
  ``networks.vp_noise_prediction_loss`` (linear-:math:`\beta` schedule,
  :math:`\beta_{\min}=0.1, \beta_{\max}=20`, noise label :math:`999\,t`),

  .. math::  \mathcal L = \tfrac1B \textstyle\sum_b
             \|F_\theta(\alpha_t x_0 + \sigma_t \epsilon,\ 999\,t) - \epsilon\|^2,

  backward, and ``torch.optim.Adam(lr=2e-4)``;

each as the median over ``--repeats`` calls after a first call, whose time is reported too.
Prints one line ``RESULT {json}`` with the times in seconds (wall and process CPU), the
parameter count and ``ru_maxrss`` of the process in bytes.

Usage (normally through ``edm_side_by_side.py``)::

    TORCH_PYTHON experiments/benchmarks/edm_songunet_torch.py --edm=EDM_DIR \
        --network='{"img_resolution": 32, "in_channels": 3, "out_channels": 3}' --batch=8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import types


def _timed(fn, repeats: int, names: tuple[str, str, str]) -> dict[str, float]:
    """The seconds of the first call of ``fn()``, then the medians of wall and process CPU
    time over ``repeats`` more, under ``names``."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(zip(names, (first, statistics.median(wall), statistics.median(cpu)), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm", help="folder of EDM's repository")
    parser.add_argument("--network", help="SongUNet keyword arguments, JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.edm and args.network):
        # ``make bench`` runs every script bare, with this project's Python (no torch).
        print("edm_songunet_torch: the PyTorch side of edm_side_by_side.py; run that")
        return

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.edm)
    try:
        import requests  # noqa: F401  (dnnlib imports it for downloads, unused here)
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")
    from training.networks import SongUNet

    torch.manual_seed(0)
    kwargs = json.loads(args.network)
    net = SongUNet(**kwargs)
    num_params = sum(p.numel() for p in net.parameters())
    shape = (args.batch, kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    x0 = torch.rand(shape)
    labels = torch.full((args.batch,), 0.5 * 999.0)

    def forward():
        with torch.inference_mode():
            return net(x0, labels, None)

    net.eval()
    forward_times = _timed(forward, args.repeats, ("first_forward_s", "forward_s", "forward_cpu_s"))

    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    beta_min, beta_max = 0.1, 20.0

    def train_step():
        t = torch.rand(args.batch) * (1.0 - 1e-5) + 1e-5
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha, sigma = torch.exp(log_alpha), torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
        epsilon = torch.randn_like(x0)
        x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * epsilon
        predicted = net(x_t, 999.0 * t, None)
        loss = ((predicted - epsilon) ** 2).sum(dim=(1, 2, 3)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    net.train()
    step_times = _timed(train_step, args.repeats, ("first_step_s", "step_s", "step_cpu_s"))
    result = dict(
        num_params=num_params,
        **forward_times,
        **step_times,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        threads=torch.get_num_threads(),
        version=f"torch {torch.__version__}",
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
