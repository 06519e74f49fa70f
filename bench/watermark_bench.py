"""MedLocker speed and key-size figures with the shipped models behind a loopback server (CPU unless the server has
a GPU).

Prints (and writes to --out as JSON):
- seconds per image for the whole search with the paper's defaults (Np=50, Ng=3, CR=0.9, s=10, Niter=3,
  alpha 100-255, sl=4, WAP), source = the ensemble of every served two-class classifier, on held-out test images;
- optimiser overhead ratio = candidate evaluations per second during those searches (evaluations ÷ the server's
  own search time) ÷ raw batched throughput of the same ensemble (images per second, every image through every
  model) on pre-rendered batches of the population size, chunked as the server chunks them (--inference-batch,
  default 32). The raw figure is measured two ways: in this process with the same weights and torch thread
  count (forward passes only: the strict baseline, target ≥ 0.8) and through /v1/watermark/classify (HTTP and
  encoding included), a few batches right after every search so both share the machine's load at that time;
- key size per image: bytes of one encrypted key file holding N protected 128x128 8-bit images (RGB and gray,
  default logo, random position and alpha) ÷ N;
- peak memory of the server (VmHWM) and of this process.

Figures, not pass/fail. ``--quick`` for a fast smoke run (2 images, fewer repetitions).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {
    "sl": 4.0,
    "population": 50,
    "generations": 3,
    "crossover_rate": 0.9,
    "step": 10,
    "local_iterations": 3,
    "alpha_range": [100.0, 255.0],
    "mode": "wap",
    "lesions": "none",
    "mutation": "basin-hopping",
}


def key_size(count: int, size: int = 128, seed: int = 0) -> dict:
    """Bytes per image of one encrypted key (key-file KDF; a passphrase key differs only in the header's KDF id)."""
    from medprivacy.watermark import blending
    from medprivacy.watermark.data import DataConfig, make_split
    from medprivacy.watermark.keyfile import WatermarkKey, generate_key_file, save_key

    logo = blending.default_logo()
    split = make_split("test", count, DataConfig(size=(size, size)), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    out = {}
    with tempfile.TemporaryDirectory(prefix="watermark-key-") as folder:
        secret = generate_key_file(Path(folder) / "secret")
        for kind in ("rgb", "gray"):
            key = WatermarkKey()
            for index, pixels in enumerate(split.images):
                image = pixels if kind == "rgb" else np.ascontiguousarray(pixels[..., 0])
                h, w = blending.fitted_size(image.shape, logo.shape)
                x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                key.protect(f"image-{index}", image, logo, float(rng.uniform(100, 255)), x, y)
            path = save_key(key, Path(folder) / f"{kind}.mlkey", key_file=secret)
            out[kind] = {
                "images": count,
                "key_bytes": path.stat().st_size,
                "bytes_per_image": path.stat().st_size / count,
                "image_bytes": int(split.images[0].size if kind == "rgb" else split.images[0][..., 0].size),
                "logo_size": [h, w],
            }
    return out


class RawThroughput:
    """Images/s of the same ensemble on pre-rendered batches of the population size, measured a little after every
    search so that both figures share the machine's load at the time (other jobs, turbo, thermal state).

    ``in_process``: forward passes and softmax only, in this process, with the same weights, thread count and
    chunking as the server (the strict baseline). ``endpoint``: through /v1/watermark/classify (HTTP, encoding,
    decoding included).
    """

    def __init__(self, client, models_dir: Path, names: list[str], size, batch: int, chunk: int, threads: int = 0):
        import torch

        from medprivacy.watermark.models import load_watermark_models

        if threads > 0:
            torch.set_num_threads(threads)
        self.client, self.names, self.batch, self.chunk = client, names, batch, chunk
        self.nets = {name: net for name, (net, _) in load_watermark_models(models_dir, "cpu", names).items()}
        self.x = torch.rand((batch, 3, *size), generator=torch.Generator().manual_seed(0))
        self.uint8_images = (self.x.numpy() * 255).round() / 255.0
        self.totals = {"in_process": [0, 0.0], "endpoint": [0, 0.0]}
        self.threads = torch.get_num_threads()
        self._forward()  # warm-up (allocations, lazy initialisation)
        client.classify(self.uint8_images, models=names)

    def _forward(self) -> None:
        import torch

        with torch.inference_mode():
            for start in range(0, self.batch, self.chunk):
                part = self.x[start : start + self.chunk]
                for net in self.nets.values():
                    out = net(part)
                    torch.softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), dim=1).numpy()

    def measure(self, repeats: int) -> None:
        for kind, call in (
            ("in_process", self._forward),
            ("endpoint", lambda: self.client.classify(self.uint8_images, models=self.names)),
        ):
            tic = time.perf_counter()
            for _ in range(repeats):
                call()
            self.totals[kind][0] += self.batch * repeats
            self.totals[kind][1] += time.perf_counter() - tic

    def summary(self) -> dict:
        return {
            kind: {
                "images_per_second": images / seconds,
                "images": images,
                "batch": self.batch,
                "chunk": self.chunk if kind == "in_process" else None,
                "torch_threads": self.threads if kind == "in_process" else None,
            }
            for kind, (images, seconds) in self.totals.items()
        }


def searches(client, names: list[str], count: int, size, raw: RawThroughput, repeats: int, start: int = 0) -> dict:
    from medprivacy.watermark import blending
    from medprivacy.watermark.data import DataConfig, make_split

    logo = blending.default_logo()
    split = make_split("test", count, DataConfig(size=size), start=start, dtype=np.uint8)
    rows = []
    for index, pixels in enumerate(split.images):
        tic = time.perf_counter()
        answer = client.optimize(pixels, logo, models=names, label=int(split.labels[index]), seed=index, **PAPER)
        wall = time.perf_counter() - tic
        rows.append(
            {
                "seed": int(split.seeds[index]),
                "label": int(split.labels[index]),
                "seconds": wall,
                "server_seconds": float(answer["elapsed_s"]),
                "evaluations": int(answer["evaluations"]),
                "stop_reason": answer["stop_reason"],
                "fooled": bool(answer["fooled"]),
            }
        )
        print(
            f"  image {index + 1}/{count}: {wall:6.2f} s, {answer['evaluations']} evaluations, {answer['stop_reason']}",
            flush=True,
        )
        raw.measure(repeats)
    seconds = np.array([r["seconds"] for r in rows])
    evaluations = sum(r["evaluations"] for r in rows)
    server_seconds = sum(r["server_seconds"] for r in rows)
    return {
        "images": rows,
        "mean_seconds_per_image": float(seconds.mean()),
        "median_seconds_per_image": float(np.median(seconds)),
        "mean_evaluations": evaluations / len(rows),
        "evaluations_per_second": evaluations / server_seconds,
        "fooled": sum(r["fooled"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "watermark_bench.json")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=ROOT / "Resources" / "Models",
        help="served models (default Resources/Models)",
    )
    parser.add_argument(
        "--server", default=None, help="use this running server (serving --models-dir's models) instead of starting one"
    )
    parser.add_argument(
        "--images", type=int, default=8, help="held-out images searched with the paper's defaults (default 8)"
    )
    parser.add_argument("--key-images", type=int, default=100, help="images in the key-size measurement (default 100)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="raw-throughput batches timed after each search (default 2)"
    )
    parser.add_argument("--inference-batch", type=int, default=32, help="the server's --inference-batch (default 32)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads for the server and the in-process baseline alike (default 0: torch's default; "
        "use 1 when another job keeps a core busy, or threads thrash)",
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run: 2 images, 16 key images, 1 repetition")
    args = parser.parse_args()
    if args.quick:
        args.images, args.key_images, args.repeats = 2, 16, 1
    if args.threads > 0:
        import os

        # The server child inherits these; torch reads them when it starts. This process sets torch directly.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    from medprivacy.errors import MedPrivacyError
    from medprivacy.server.local import start_local_server
    from medprivacy.transport.watermark_client import WatermarkClient

    results: dict = {
        "settings": {**PAPER, "images": args.images, "quick": args.quick, "threads": args.threads or "torch default"}
    }
    print(f"key size ({args.key_images} images of 128x128, default logo)...", flush=True)
    results["key_size"] = key_size(args.key_images)
    for kind, row in results["key_size"].items():
        print(
            f"  {kind}: {row['bytes_per_image']:.0f} bytes/image (image itself {row['image_bytes']} bytes, "
            f"logo {row['logo_size'][1]}x{row['logo_size'][0]})"
        )

    work = Path(tempfile.mkdtemp(prefix="watermark-bench-"))
    process = None
    try:
        url = args.server
        if url is None:
            server = start_local_server(
                [
                    "--host",
                    "127.0.0.1",
                    "--models-dir",
                    str(args.models_dir),
                    "--inference-batch",
                    str(args.inference_batch),
                ],
                work / "server.log",
            )
            process, url = server.process, server.url
        client = WatermarkClient(url, read_timeout=3600)
        info = client.info()
        classifiers = {
            n: d
            for n, d in sorted(info.get("models", {}).items())
            if d.get("task") == "classify" and d.get("out_channels") in (None, 2)
        }
        if not classifiers:
            print(
                f"watermark_bench: error: {url} serves no two-class watermark classifier; "
                "train them first (medprivacy watermark train)",
                file=sys.stderr,
            )
            return 2
        names = list(classifiers)
        size = tuple(int(v) for v in next(iter(classifiers.values()))["patch_size"])
        results["server"] = {"url": url, "device": info.get("device"), "models": names, "input_size": list(size)}
        print(
            f"server on {url} ({info.get('device')}), ensemble of {', '.join(names)} at {size[0]}x{size[1]}", flush=True
        )

        raw = RawThroughput(
            client, args.models_dir, names, size, PAPER["population"], args.inference_batch, args.threads
        )
        print(
            f"searching {args.images} held-out images with the paper's defaults (raw throughput timed after each)...",
            flush=True,
        )
        results["search"] = searches(client, names, args.images, size, raw, args.repeats)
        results.update({f"raw_{kind}": figures for kind, figures in raw.summary().items()})
        if process is not None:
            status = Path(f"/proc/{process.pid}/status")
            if status.is_file():
                line = next(
                    (line for line in status.read_text(encoding="utf-8").splitlines() if line.startswith("VmHWM")), None
                )
                results["server_peak_rss_mb"] = int(line.split()[1]) / 1024 if line else None
    except MedPrivacyError as exc:
        print(f"watermark_bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if process is not None:
            server.stop()
    results["client_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    search = results["search"]
    strict = search["evaluations_per_second"] / results["raw_in_process"]["images_per_second"]
    endpoint = search["evaluations_per_second"] / results["raw_endpoint"]["images_per_second"]
    results["overhead_ratio"] = {
        "vs_in_process": strict,
        "vs_classify_endpoint": endpoint,
        "target": 0.8,
        "definition": "candidate evaluations per second of server search time ÷ images per second of the same "
        "ensemble on pre-rendered batches of the population size (every image through every model)",
    }
    print(
        f"seconds per image (paper defaults, ensemble of {len(names)}): mean {search['mean_seconds_per_image']:.2f}, "
        f"median {search['median_seconds_per_image']:.2f}; {search['mean_evaluations']:.0f} evaluations/image, "
        f"{search['fooled']}/{len(search['images'])} fooled every model"
    )
    print(
        f"optimiser: {search['evaluations_per_second']:.1f} candidate evaluations/s; raw ensemble "
        f"{results['raw_in_process']['images_per_second']:.1f} images/s in process, "
        f"{results['raw_endpoint']['images_per_second']:.1f} images/s through /classify"
    )
    print(
        f"overhead ratio: {strict:.2f} vs in-process forward passes, {endpoint:.2f} vs the classify endpoint "
        "(target ≥ 0.8)"
    )
    print(
        f"peak memory: server {results.get('server_peak_rss_mb') or float('nan'):.0f} MB, "
        f"bench process {results['client_peak_rss_mb']:.0f} MB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
