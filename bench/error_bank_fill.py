"""How full the ERFT error banks get over a training run, and what they take in RAM and on disk (method §E.3, §E.5).

Reads the bank settings, the run length and the rank count from a teacher config and prints, per bucket, the
expected number of entries at the end of the run, then the totals per bank, per rank and per node.

Model of one bank on one rank: every harvested error lands in bucket b with probability p_b, the share of the
1000-point shift-s training grid (§E.3 step 1, `cf.diffusion.sample_grid_timesteps`) whose nearest bucket timestep is
b (`ErrorBank.bucket_index`). During the first ``warmup_steps`` steps the errors of all ranks are gathered and kept
unless clean (clean with probability ``clean_prob``, then kept with ``clean_insert_prob``); afterwards the rank's own
error is kept every step. So n_b = Binomial(W·R·B, k·p_b) + Binomial((S − W)·B, p_b) with k the warm-up keep
probability, exact for B = 1 (one clean flag per rank and step), and the bucket ends with min(n_b, K) entries while
the total cap does not bind (checked and printed).

    python bench/error_bank_fill.py                                     # configs/wan1.3b/teacher_erft.yaml
    python bench/error_bank_fill.py --simulate 4                        # and 4 simulated runs of the bank
    python bench/error_bank_fill.py --config configs/toy/teacher_erft.yaml --height 64 --width 64 --spatial-factor 8
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import torch
import yaml

from cf.diffusion import sample_grid_timesteps, timestep_grid
from cf.error_bank import NUM_TRAIN_TIMESTEPS, ErrorBank
from cf.error_storage import DiskEntryStore
from cf.models.wan import WanConfig

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def binomial_pmf(n: int, p: float) -> torch.Tensor:
    """P(X = k) for k = 0…n, float64 ``[n + 1]``."""
    k = torch.arange(n + 1, dtype=torch.float64)
    if p <= 0.0:
        return (k == 0).double()
    if p >= 1.0:
        return (k == n).double()
    log_choose = torch.lgamma(k.new_tensor(n + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    return torch.exp(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))


def convolve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """pmf of the sum of two independent counts with pmfs ``a`` and ``b``."""
    out = torch.zeros(a.numel() + b.numel() - 1, dtype=torch.float64)
    for i, weight in enumerate(a.tolist()):
        if weight > 0:
            out[i:i + b.numel()] += weight * b
    return out


def simulate(s: dict[str, Any], max_entries: int, runs: int, seed: int = 0) -> torch.Tensor:
    """Mean entries per bucket ``[num_buckets]`` over ``runs`` simulated runs of one rank's `ErrorBank` (1-element
    entries; the other ranks' timesteps and clean flags come through a stand-in gather)."""
    total = torch.zeros(s["num_buckets"], dtype=torch.float64)
    batch, others = s["batch"], s["ranks"] - 1
    for run in range(runs):
        g = torch.Generator().manual_seed(seed + run)

        def gather(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 5:  # the errors: values do not matter here
                return torch.cat([x, x.new_zeros(others * batch, *x.shape[1:])])
            t = sample_grid_timesteps(others * batch, s["shift"], generator=g)
            clean = (torch.rand(others, generator=g) < s["clean_prob"]).float().repeat_interleave(batch)
            return torch.cat([x, torch.stack([t, clean], dim=1)])

        bank = ErrorBank(num_buckets=s["num_buckets"], capacity=s["capacity"], shift=s["shift"], policy=s["policy"],
                         max_total_entries=max_entries, warmup_steps=s["warmup_steps"],
                         clean_insert_prob=s["clean_insert_prob"], gather=gather, seed=seed + run)
        for _ in range(s["steps"]):
            t = sample_grid_timesteps(batch, s["shift"], generator=g)
            clean = bool(torch.rand(1, generator=g) < s["clean_prob"])
            bank.insert(torch.zeros(batch, 1, 1, 1, 1), t, clean_step=clean)
        total += torch.tensor(bank.bucket_counts(), dtype=torch.float64)
    return total / max(runs, 1)


def disk_bookkeeping(s: dict[str, Any], num_entries: int, max_entries: int) -> tuple[int, int]:
    """(Python heap bytes of a disk-stored bank's tables, bytes of its saved state) with ``num_entries`` entries,
    measured on a bank of 1-element entries in a temporary folder (the tables do not depend on the entry size)."""
    with tempfile.TemporaryDirectory() as folder:
        bank = ErrorBank(num_buckets=s["num_buckets"], capacity=s["capacity"], shift=s["shift"], warmup_steps=0,
                         max_total_entries=max_entries, storage="disk", storage_dir=folder, rank=0)
        g = torch.Generator().manual_seed(0)
        tracemalloc.start()
        for _ in range(num_entries):
            bank.store(torch.randn(1, 1, 1, 1, 1, generator=g), sample_grid_timesteps(1, s["shift"], generator=g))
        heap = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        buffer = io.BytesIO()
        torch.save(bank.state_dict(), buffer)
        bank.close()
    return heap, buffer.tell()


def bank_settings(config: dict[str, Any]) -> dict[str, Any]:
    model = config["model"]["init_args"]
    erft = dict(model.get("erft") or {})
    trainer = config["trainer"]
    network = model.get("network") or {}
    long_layout = model.get("long_layout") or {}
    return {
        "num_buckets": int(erft.get("num_buckets", 50)),
        "capacity": int(erft.get("capacity", 500)),
        "warmup_steps": int(erft.get("warmup_steps", 50)),
        "clean_prob": float(erft.get("clean_prob", 0.5)),
        "clean_insert_prob": float(erft.get("clean_insert_prob", 0.1)),
        "max_total_entries": erft.get("max_total_entries"),
        "max_total_bytes": erft.get("max_total_bytes"),
        "storage_dtype": str(erft.get("storage_dtype", "float16")),
        "storage": str(erft.get("storage", "memory")),
        "policy": str(erft.get("policy", "l2_batch")),
        "shift": float(model.get("shift", 5.0)),
        "channels": int(network.get("in_dim", WanConfig.wan2_1_1_3b().in_dim)),
        "target_latents": int(long_layout.get("target_latents", 21)),
        "steps": int(trainer["max_steps"]),
        "ranks": int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1)),
        "ranks_per_node": int(trainer.get("devices", 1)),
        "batch": int(config["data"]["init_args"].get("batch_size", 1)),
        "height": int(config["data"]["init_args"]["height"]),
        "width": int(config["data"]["init_args"]["width"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "wan1.3b" / "teacher_erft.yaml")
    parser.add_argument("--spatial-factor", type=int, default=8, help="autoencoder spatial factor (Wan2.1 VAE: 8)")
    parser.add_argument("--height", type=int, default=None, help="pixel height (default: the config's data)")
    parser.add_argument("--width", type=int, default=None, help="pixel width (default: the config's data)")
    parser.add_argument("--simulate", type=int, default=0, metavar="RUNS",
                        help="also run one rank's ErrorBank through RUNS whole runs and print its mean fill")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = bank_settings(yaml.safe_load(args.config.read_text()))
    height, width = args.height or s["height"], args.width or s["width"]

    dtype = getattr(torch, s["storage_dtype"])
    shape = (s["channels"], s["target_latents"], height // args.spatial_factor, width // args.spatial_factor)
    entry_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    most = s["num_buckets"] * s["capacity"]
    if s["max_total_entries"] is not None:
        most = min(most, int(s["max_total_entries"]))
    reserved = DiskEntryStore("unused", "bank", dtype, most, s["max_total_bytes"]).reserved_slots(entry_bytes)

    bank = ErrorBank(num_buckets=s["num_buckets"], capacity=s["capacity"], shift=s["shift"])
    grid = timestep_grid(s["shift"], NUM_TRAIN_TIMESTEPS).float()  # what sample_grid_timesteps draws from
    points = torch.bincount(bank.bucket_index(grid), minlength=s["num_buckets"])
    share = points.double() / grid.numel()
    simulated = simulate(s, reserved, args.simulate) if args.simulate > 0 else None

    steps, warm, ranks, batch = s["steps"], min(s["warmup_steps"], s["steps"]), s["ranks"], s["batch"]
    capacity = s["capacity"]
    keep = (1 - s["clean_prob"]) + s["clean_prob"] * s["clean_insert_prob"]
    warm_errors, later_errors = warm * ranks * batch, (steps - warm) * batch
    name = args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
    print(f"config={name} steps={steps} ranks={ranks} batch/rank={batch} buckets={s['num_buckets']} K={capacity} "
          f"shift={s['shift']:g} warmup={warm} clean_prob={s['clean_prob']:g} "
          f"clean_insert_prob={s['clean_insert_prob']:g}")
    print(f"harvests per bank and rank: {warm_errors} gathered in the warm-up (kept with p={keep:g}, "
          f"{warm_errors * keep:.0f} expected) + {later_errors} own = {warm_errors * keep + later_errors:.0f} expected")
    sim_header = f" {'sim mean':>8}" if simulated is not None else ""
    print(f"{'bucket':>6} {'t':>7} {'grid pts':>8} {'E[entries]':>10} {'P(n>=K)':>9}{sim_header}")
    expected_total = 0.0
    for b in range(s["num_buckets"]):
        p = float(share[b])
        pmf = convolve(binomial_pmf(warm_errors, keep * p), binomial_pmf(later_errors, p))
        counts = torch.arange(pmf.numel(), dtype=torch.float64)
        fill = float((pmf * counts.clamp(max=capacity)).sum())
        saturated = float(pmf[capacity:].sum())
        expected_total += fill
        sim = f" {float(simulated[b]):>8.1f}" if simulated is not None else ""
        print(f"{b:>6} {float(bank.timesteps[b]):>7.1f} {int(points[b]):>8} {fill:>10.1f} {saturated:>9.1e}{sim}")
    if simulated is not None:
        print(f"simulated ({args.simulate} runs): {float(simulated.sum()):.1f} entries per bank, "
              f"expected {expected_total:.1f}")

    most_harvested = warm_errors + later_errors
    binds = most_harvested > reserved
    filled = min(expected_total, reserved) * entry_bytes
    per_node = s["ranks_per_node"]
    print(f"entry {list(shape)} {s['storage_dtype']}: {entry_bytes} bytes ({entry_bytes / 2**20:.2f} MiB)")
    fullest = float(share.max()) * (warm_errors * keep + later_errors)
    print(f"expected entries per bank and rank: {expected_total:.0f} of nominal {s['num_buckets']} x {capacity} = "
          f"{s['num_buckets'] * capacity}; fullest bucket {fullest:.0f}")
    print(f"total cap: {reserved} entries ({reserved * entry_bytes / GIB:.2f} GiB) per bank; at most "
          f"{most_harvested} harvests, so the cap {'binds' if binds else 'never binds'}")
    if binds:
        print(f"  the bank ends with at most {reserved} entries, evicted from the fullest buckets, so it mostly holds "
              "recent errors; the per-bucket column is without the cap")
    print(f"storage=memory: RAM {filled / GIB:.2f} GiB per bank, {2 * filled / GIB:.2f} GiB per rank, "
          f"{2 * filled * per_node / GIB:.1f} GiB per node ({per_node} ranks); checkpoints carry it all")
    file_bytes = reserved * entry_bytes
    heap, state_bytes = disk_bookkeeping(s, round(min(expected_total, reserved)), reserved)
    print(f"storage=disk: file {file_bytes / GIB:.2f} GiB reserved per bank, {filled / GIB:.2f} GiB written; "
          f"{2 * file_bytes / GIB:.2f} GiB per rank, {2 * file_bytes * per_node / GIB:.1f} GiB per node of local disk")
    print(f"  RAM per bank: {heap / 2**20:.2f} MiB of slot tables (measured; the OS page cache holds touched entries "
          f"and is reclaimable); checkpoint per bank: a {state_bytes / 2**10:.0f} KiB reference (path, slots, CRCs)")
    print(f"configured storage: {s['storage']}")


if __name__ == "__main__":
    main()
