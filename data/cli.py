"""``cf data shards|synth|encode|ode-pairs``: write video shards, the synthetic dataset, latent shards, and the
teacher's ODE trajectories."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path


def json_object(text: str) -> dict:
    """argparse type: a JSON object given on the command line, e.g. '{\"dim\": 32}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exn:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exn})") from exn
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"dim\": 32}}', got {text!r}")
    return value


def _print_report(report, out_pattern: str, what: str = "samples") -> None:
    """What a writer wrote; under torchrun, which process wrote it and how to name the shards of all of them."""
    from cf.launch import launch_rank_and_world

    rank, world = launch_rank_and_world()
    where = f"process {rank} of {world} " if world > 1 else ""
    print(f"{where}wrote {report.num_samples} {what} in {report.num_shards} shard(s): {report.urls or '-'}")
    if report.skipped:
        print("skipped: " + ", ".join(f"{reason}={count}" for reason, count in sorted(report.skipped.items())))
    if world > 1 and rank == 0:
        every = re.sub(r"%0?\d*d", "*", out_pattern)
        print(f"the {world} processes number their shards rank, rank + {world}, rank + {2 * world}, ...; "
              f"read the shards of all of them as {every}")


def run_shards(args: argparse.Namespace) -> None:
    """``cf data shards``: shard mp4 + caption pairs from a folder or a CSV."""
    from data.shards import write_shards_from_csv, write_shards_from_folder

    if (args.folder is None) == (args.csv is None):
        raise SystemExit("cf data shards: give exactly one of --folder DIR or --csv FILE")
    if args.folder is not None:
        report = write_shards_from_folder(args.folder, args.out, maxcount=args.maxcount)
    else:
        report = write_shards_from_csv(args.csv, args.out, maxcount=args.maxcount, video_root=args.video_root)
    _print_report(report, args.out)


def run_synth(args: argparse.Namespace) -> None:
    """``cf data synth``: render the synthetic long-range dataset."""
    from data.synthetic import write_synthetic_shards

    splits = None
    if args.val_clips is not None:
        splits = {"train": args.num_clips - args.val_clips, "val": args.val_clips}
    result = write_synthetic_shards(
        args.out, num_clips=args.num_clips, seed=args.seed, splits=splits, maxcount=args.maxcount,
        height=args.height, width=args.width, fps=args.fps, min_seconds=args.min_seconds,
        max_seconds=args.max_seconds, crf=args.crf, unnamed_fraction=args.unnamed_fraction, num_workers=args.workers,
    )
    for split, info in result.items():
        print(f"{split}: {info['num_clips']} clips  urls={info['urls']}  prompts={info['prompts']}")


def run_encode(args: argparse.Namespace) -> None:
    """``cf data encode``: video shards -> latent shards with the chosen autoencoder and text encoder. Under
    torchrun each process encodes every WORLD_SIZE-th input shard from RANK on its own GPU (`cf.launch`)."""
    from cf.encoders import build_autoencoder, build_text_encoder
    from cf.launch import launch_rank_and_world, process_device
    from data.encode import encode_shards

    rank, world = launch_rank_and_world()
    autoencoder = build_autoencoder(args.autoencoder, dtype=args.encoder_dtype, **args.autoencoder_args)
    text_encoder = build_text_encoder(args.text_encoder, dtype=args.encoder_dtype, **args.text_encoder_args)
    report = encode_shards(
        args.inputs, args.out, autoencoder, text_encoder, num_frames=args.num_frames, height=args.height,
        width=args.width, fps=args.fps, min_frames=args.min_frames, batch_size=args.batch_size,
        maxcount=args.maxcount, latent_dtype=args.latent_dtype, device=process_device(args.device),
        num_workers=args.workers, rank=rank, world_size=world,
    )
    _print_report(report, args.out)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command with sub-commands ``shards``, ``synth``, ``encode`` and ``ode-pairs``."""
    parser = subparsers.add_parser("data", help="write video shards, the synthetic dataset, latent shards",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="data_command", metavar="data_command", required=True)

    shards = commands.add_parser("shards", help="shard x.mp4 + x.txt pairs (folder) or a videoFile,caption CSV")
    shards.add_argument("--folder", default=None, help="folder of x.mp4 with captions in x.txt")
    shards.add_argument("--csv", default=None, help="CSV with columns videoFile, caption")
    shards.add_argument("--video-root", default=None, help="base of relative CSV paths (default: the CSV's folder)")
    shards.add_argument("--out", required=True, help="output pattern with one integer field, e.g. out/train-%%06d.tar")
    shards.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    shards.set_defaults(func=run_shards)

    synth = commands.add_parser("synth", help="render the synthetic sprite dataset (train/val shards + prompts.txt)")
    synth.add_argument("--out", required=True, help="output folder (gets <split>/shard-%%06d.tar, <split>/prompts.txt)")
    synth.add_argument("--num-clips", type=int, default=256, help="clips over all splits (default 256)")
    synth.add_argument("--val-clips", type=int, default=None, help="clips in 'val' (default 10%%)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--height", type=int, default=64)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--fps", type=int, default=16)
    synth.add_argument("--min-seconds", type=float, default=10.0)
    synth.add_argument("--max-seconds", type=float, default=30.0)
    synth.add_argument("--maxcount", type=int, default=64, help="clips per shard (default 64)")
    synth.add_argument("--unnamed-fraction", type=float, default=0.0,
                       help="fraction of clips whose caption names only the sprite count and the texture, "
                            "e.g. 'two shapes on a striped background' (default 0)")
    synth.add_argument("--crf", type=int, default=None,
                       help="store lossy H.264 at this crf instead of lossless RGB (default: lossless, "
                            "byte-reproducible)")
    synth.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 2)")
    synth.set_defaults(func=run_synth)

    encode = commands.add_parser("encode", help="video shards -> latent shards (latent.pth, text.pth, txt, json)")
    encode.add_argument("inputs", help="input video shards in brace notation, e.g. 'in/train-{000000..000009}.tar'")
    encode.add_argument("--out", required=True, help="output pattern with one integer field, e.g. out/lat-%%06d.tar")
    encode.add_argument("--autoencoder", default="toy", help="'toy' or a local Wan VAE folder (default toy)")
    encode.add_argument("--autoencoder-args", type=json_object, default={},
                        help="JSON keyword arguments for the toy autoencoder, e.g. '{\"latent_channels\": 4}'")
    encode.add_argument("--text-encoder", default="hashed", help="'hashed' or a local umT5 folder (default hashed)")
    encode.add_argument("--text-encoder-args", type=json_object, default={},
                        help="JSON keyword arguments, e.g. '{\"dim\": 32, \"max_length\": 16}' (hashed) "
                             "or '{\"max_length\": 512}' (umT5)")
    encode.add_argument("--encoder-dtype", default="float32", help="dtype of the encoders (default float32)")
    encode.add_argument("--latent-dtype", default="float32", help="dtype stored in the shards (e.g. bfloat16)")
    encode.add_argument("--num-frames", type=int, default=81, help="pixel frames per clip, 1 + 4k (default 81)")
    encode.add_argument("--min-frames", type=int, default=0, help="skip videos shorter than this after resampling")
    encode.add_argument("--height", type=int, default=480)
    encode.add_argument("--width", type=int, default=832)
    encode.add_argument("--fps", type=float, default=16.0)
    encode.add_argument("--batch-size", type=int, default=1)
    encode.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    encode.add_argument("--device", default="cpu")
    encode.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding the videos")
    encode.set_defaults(func=run_encode)
    register_ode_pairs(commands)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `cf data ode-pairs`
# ----------------------------------------------------------------------------------------------------------------------


def _teacher_config(weights: Path, network: str | None) -> dict:
    """WanConfig fields: from --network (a preset name or a JSON file) or the config.json beside the weights."""
    from cf.models.wan import WanConfig

    if network in WanConfig.PRESETS:
        return asdict(WanConfig.preset(network))
    source = Path(network) if network else weights.parent / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"no DiT config: {source} does not exist; pass --network tiny | wan2.1-1.3b | "
                                "<config.json> (the teacher export writes config.json beside its weights)")
    raw = json.loads(source.read_text())
    return dict(raw.get("wan_config", raw))


def run_ode_pairs(args: argparse.Namespace) -> None:
    """``cf data ode-pairs``: teacher ODE trajectories for the stage-0 regression. Under torchrun each process
    integrates every WORLD_SIZE-th prompt from RANK (seeds and keys by the prompt's global index, `cf.launch`)."""
    from cf.encoders import build_text_encoder, resolve_dtype
    from cf.launch import launch_rank_and_world, process_device, process_share
    from cf.models.wan import WanConfig, WanDiT
    from cf.weights import load_wan_weights
    from data.ode_pairs import ODEPairConfig, write_ode_pairs
    from data.pipeline import read_prompt_file

    weights = Path(args.teacher)
    if not weights.exists():
        raise FileNotFoundError(f"teacher weights {weights} do not exist; pass the Wan-layout teacher "
                                "(`cf convert teacher` output) or Wan2.1 weights")
    if args.samples_per_prompt < 1:
        raise ValueError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    # trajectory k of prompt i is number i * samples_per_prompt + k: its own noise seed and key
    prompts = [p for p in read_prompt_file(args.prompts)[: args.limit] for _ in range(args.samples_per_prompt)]
    rank, world = launch_rank_and_world()
    mine = process_share(len(prompts))
    if not mine:
        print(f"process {rank} of {world}: no prompt left for this process ({len(prompts)} prompts)")
        return
    teacher = WanDiT(WanConfig(**_teacher_config(weights, args.network)))
    load_wan_weights(teacher, weights)
    teacher = teacher.to(resolve_dtype(args.dtype)).requires_grad_(False)
    text_encoder = build_text_encoder(args.text_encoder, dtype=args.dtype, **args.text_encoder_args)
    config = ODEPairConfig(num_frames=args.num_frames, latent_size=tuple(args.latent_size), num_steps=args.num_steps,
                           shift=args.shift, guidance_scale=args.guidance, stored_steps=tuple(args.stored_steps),
                           negative_prompt=args.negative_prompt)
    report = write_ode_pairs(teacher, text_encoder, [prompts[i] for i in mine], args.out, config, seed=args.seed,
                             batch_size=args.batch_size, maxcount=args.maxcount,
                             storage_dtype=resolve_dtype(args.storage_dtype), device=process_device(args.device),
                             indices=mine, first_shard=rank, shard_stride=world)
    _print_report(report, args.out, "ODE pairs")


def register_ode_pairs(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ode-pairs`` to the sub-commands of ``cf data``."""
    import data.ode_pairs as ode_pairs

    p = data_subparsers.add_parser("ode-pairs", help="teacher ODE trajectories for the stage-0 student init",
                                   description=ode_pairs.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="bidirectional teacher weights (Wan layout .safetensors)")
    p.add_argument("--network", default=None,
                   help="DiT config: tiny | wan2.1-1.3b | a config.json (default: config.json beside the weights)")
    p.add_argument("--prompts", required=True, help="text file with one prompt per line")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="trajectories per prompt, each from its own noise (default 1)")
    p.add_argument("--out", required=True, help="output pattern with one integer field, e.g. out/ode-%%06d.tar")
    p.add_argument("--text-encoder", default="hashed", help="'hashed' or a local umT5 folder (default hashed)")
    p.add_argument("--text-encoder-args", type=json_object, default={},
                   help="JSON keyword arguments, e.g. '{\"dim\": 32, \"max_length\": 8}'")
    p.add_argument("--num-frames", type=int, default=21, help="latent frames per trajectory (default 21)")
    p.add_argument("--latent-size", type=int, nargs=2, default=[60, 104], metavar=("H", "W"),
                   help="latent height and width (default 60 104)")
    p.add_argument("--num-steps", type=int, default=48, help="Euler steps (default 48)")
    p.add_argument("--shift", type=float, default=8.0, help="grid shift (default 8)")
    p.add_argument("--guidance", type=float, default=6.0, help="CFG scale g of uncond + g(cond - uncond) (default 6)")
    p.add_argument("--stored-steps", type=int, nargs="+", default=[0, 12, 24, 36],
                   help="steps whose input state is stored (default 0 12 24 36)")
    p.add_argument("--negative-prompt", default=ode_pairs.WAN_NEGATIVE_PROMPT,
                   help="unconditional prompt (default: Wan's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--maxcount", type=int, default=1000, help="pairs per shard (default 1000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="dtype of the teacher and text encoder (default float32)")
    p.add_argument("--storage-dtype", default="float32", help="dtype stored in the shards (e.g. bfloat16)")
    p.set_defaults(func=run_ode_pairs)
    return p
