r"""Side by side: EDM's DDPM++ ``SongUNet`` in PyTorch and ours, same architecture and size.

For a preset it times both networks on the same batch: the training step (forward, the VP
noise-prediction loss of ``networks.vp_noise_prediction_loss``, backward, Adam), the forward
pass, the first call (ours: tracing and XLA compilation, then the first run) and the peak
host memory (``ru_maxrss`` of the process). The two sides ALTERNATE, EDM then ours,
``--pairs`` times, each run a fresh process: the PyTorch side is
``edm_songunet_torch.py`` run by ``--torch-python``, which imports EDM's code from
``--edm`` (nothing of EDM is copied into this project); our side is this script again with
``--side=ours``, building the network by ``diffusion_sde.models.get_model`` through
``networks.benchmark``. A fresh process per run makes ``ru_maxrss`` that run's peak and
lets each run pay its own first call; alternating spreads a shared machine's load over
both sides. It prints the parameter counts (they must agree), then per quantity the median
over the runs (the range in brackets) and the ratio PyTorch / ours.

Presets (32x32x3 images; DDPM++ as in EDM's CIFAR-10 runs: positional embedding, standard
encoder and decoder, ``[1, 1]`` resampling filter, attention at 16x16, dropout 0.1):

- ``full``: 128 channels, multipliers (2, 2, 2), 4 blocks a level, 55,732,739 parameters,
  batch 8;
- ``small``: 32 channels, multipliers (1, 2, 2), 2 blocks a level, 1,754,147 parameters,
  batch 16.

Both sides run with glibc's ``glibc.malloc.hugetlb=1`` (``GLIBC_TUNABLES``), which our
entry points set for themselves (``diffusion_sde.host_memory``); ``--no-huge-pages`` runs
both without it.

Threads: PyTorch runs with ``--threads`` (``torch.set_num_threads``); XLA's CPU client uses
every core the process may run on. On a machine with more cores than ``--threads``, pin
both sides to the same cores, e.g. ``taskset -c 0,1 python ...`` (subprocesses inherit it).

Usage::

    python experiments/benchmarks/edm_side_by_side.py --edm=EDM_DIR \
        --torch-python=TORCH_VENV/bin/python --preset=small --pairs=3
    python experiments/benchmarks/edm_side_by_side.py --preset=small --profile  # ours only

``--edm`` and ``--torch-python`` default to ``$EDM_DIR`` and ``$TORCH_PYTHON``; without
them the script prints that it skipped. ``--profile`` runs our side alone and prints ``step_profile.profile_step`` of its training
step. With ``JAX_COMPILATION_CACHE_DIR`` set, our compile time after the first run is a read
from that cache. Timings on a shared machine are noisy: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys

import jax
import ml_collections

# The repository root on sys.path, for ``experiments.benchmarks.*``.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from diffusion_sde.host_memory import with_huge_pages  # noqa: E402
from diffusion_sde.training import loop  # noqa: E402
from experiments.benchmarks import networks  # noqa: E402

PRESETS = {"full": ("edm_ddpmpp", 8), "small": ("edm_ddpmpp_small", 16)}
IMAGE_SIZE, CHANNELS = 32, 3
_HERE = pathlib.Path(__file__).resolve().parent


def model_config(preset: str) -> ml_collections.ConfigDict:
    """Our DDPM++ config of ``preset``."""
    return ml_collections.ConfigDict(dict(networks.PRESETS[PRESETS[preset][0]][0], name="ncsnpp"))


def songunet_kwargs(config: ml_collections.ConfigDict) -> dict:
    """EDM's ``SongUNet`` arguments for the DDPM++ architecture of our ``config``."""
    return dict(
        img_resolution=IMAGE_SIZE,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        model_channels=config.nf,
        channel_mult=list(config.ch_mult),
        num_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions),
        dropout=config.dropout,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    )


def run_ours(args: argparse.Namespace) -> dict:
    """Our side in this process: ``networks.benchmark`` of the preset's network."""
    options = argparse.Namespace(
        batch=args.batch,
        image_size=IMAGE_SIZE,
        channels=CHANNELS,
        repeats=args.repeats,
        profile=args.profile,
    )
    result = networks.benchmark(model_config(args.preset), options)
    result.pop("device_peak_bytes")
    result.pop("step_devices")
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["first_step_s"] = result["step_compile_s"] + result["step_first_s"]
    result["first_forward_s"] = result["forward_compile_s"] + result["forward_first_s"]
    result["version"] = f"jax {jax.__version__}"
    return result


def run_process(command: list[str], environment: dict[str, str]) -> dict:
    """The ``RESULT {json}`` line that ``command`` prints, run in ``environment``."""
    process = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command[:2])} failed ({process.returncode}):\n{process.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def _commands(args: argparse.Namespace) -> dict[str, list[str]]:
    common = [f"--batch={args.batch}", f"--repeats={args.repeats}"]
    network = json.dumps(songunet_kwargs(model_config(args.preset)))
    edm = [args.torch_python, str(_HERE / "edm_songunet_torch.py"), f"--edm={args.edm}"]
    ours = [sys.executable, str(pathlib.Path(__file__).resolve()), "--side=ours"]
    return {
        "EDM (PyTorch)": [*edm, f"--network={network}", f"--threads={args.threads}", *common],
        "ours (JAX)": [*ours, f"--preset={args.preset}", *common],
    }


ROWS = (  # (label, key, unit scale, ratio shown)
    ("training step (s)", "step_s", 1.0, True),
    ("training step, process CPU time (s)", "step_cpu_s", 1.0, False),
    ("forward (s)", "forward_s", 1.0, True),
    ("forward, process CPU time (s)", "forward_cpu_s", 1.0, False),
    ("first step (s; ours: trace + compile + run)", "first_step_s", 1.0, False),
    ("first forward (s; ours: trace + compile + run)", "first_forward_s", 1.0, False),
    ("peak host memory, ru_maxrss (GiB)", "peak_rss_bytes", 2.0**-30, True),
)


def print_table(runs: dict[str, list[dict]]) -> None:
    """Medians over the runs (range in brackets) and the ratios PyTorch / ours."""
    edm, ours = runs.values()

    def cell(results, key, scale):
        values = [scale * r[key] for r in results]
        spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
        return statistics.median(values), f"{statistics.median(values):.3f}{spread}"

    print(f"| | {' | '.join(runs)} | PyTorch / ours |\n|---|---:|---:|---:|")
    for label, key, scale, show_ratio in ROWS:
        (edm_value, edm_text), (ours_value, ours_text) = (
            cell(edm, key, scale),
            cell(ours, key, scale),
        )
        ratio = f"{edm_value / ours_value:.2f}" if show_ratio else ""
        print(f"| {label} | {edm_text} | {ours_text} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--edm", help="EDM's repository (training/, ...); default $EDM_DIR")
    parser.add_argument("--torch-python", help="a Python with torch; default $TORCH_PYTHON")
    parser.add_argument("--pairs", type=int, default=3, help="EDM-then-ours runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per run")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    parser.add_argument("--batch", type=int, help="default: the preset's")
    parser.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="profile our training step")
    parser.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="run both sides without glibc.malloc.hugetlb=1 (by default both run with it)",
    )
    args = parser.parse_args()
    args.batch = args.batch or PRESETS[args.preset][1]
    if args.side or args.profile:
        loop.use_cpu_devices(args.batch)  # as training does, before anything touches devices
        result = run_ours(args)
        print(("RESULT " if args.side else "") + json.dumps(result), flush=True)
        return
    args.edm = args.edm or os.environ.get("EDM_DIR")
    args.torch_python = args.torch_python or os.environ.get("TORCH_PYTHON")
    if not (args.edm and args.torch_python):
        # ``make bench`` runs every script bare: without EDM and torch there is nothing to do.
        print("edm_side_by_side: skipped; give --edm and --torch-python (or EDM_DIR, TORCH_PYTHON)")
        return

    print(
        f"preset {args.preset}: batch {args.batch} x {IMAGE_SIZE}x{IMAGE_SIZE}x{CHANNELS}, "
        f"{args.pairs} pairs of runs, {args.repeats} timed calls each, PyTorch "
        f"{args.threads} threads, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    commands = _commands(args)
    environment = dict(os.environ) if args.no_huge_pages else with_huge_pages(os.environ)
    print(f"both sides with GLIBC_TUNABLES={environment.get('GLIBC_TUNABLES', '')!r}")
    runs: dict[str, list[dict]] = {side: [] for side in commands}
    for pair in range(args.pairs):
        for side, command in commands.items():
            result = run_process(command, environment)
            runs[side].append(result)
            print(
                f"  pair {pair + 1}, {side} ({result['version']}): step {result['step_s']:.3f} s, "
                f"forward {result['forward_s']:.3f} s; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    counts = {side: results[0]["num_params"] for side, results in runs.items()}
    print("parameters: " + ", ".join(f"{side} {n:,}" for side, n in counts.items()))
    print_table(runs)
    if len(set(counts.values())) != 1:
        raise SystemExit("the parameter counts differ: not the same network")


if __name__ == "__main__":
    main()
