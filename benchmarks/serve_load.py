"""``cxr serve`` under load on loopback: server-side batching on vs off, in the same run.

One embedded Ray, one Serve proxy on 127.0.0.1, and ``cxr serve``'s application (``evaluation/serve.py``
``build_app``, one replica each) deployed twice side by side: with batching under ``/on``, without
under ``/off``. Each load is closed-loop: ``--clients`` threads, each sending ``--requests`` requests
one after another over its own keep-alive connection (the real NIH 1024x1024 originals, as the
bodies a client would send), and a one-client run of ``--requests``. The loads alternate between
the two applications for ``--rounds`` rounds (on, off, then off, on, ...), so that a machine shared
with other work slows both alike; the figures pool every round. Latency is measured by the client,
from sending the request to reading the whole answer. Every answer must be 200: errors are counted
and reported (they must be 0).

The checkpoint has random weights unless ``--checkpoint`` names one (speed does not depend on what a
model learned), with OOD statistics fit on 96 of the images, as in benchmarks/score.py.

    nice -n 10 .venv/bin/python benchmarks/serve_load.py --image-size 112 --clients 8 --requests 50 --rounds 3
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pandas as pd

from benchmarks.preprocess import originals
from benchmarks.score import make_checkpoint
from cxr.runtime import ray_session
from evaluation.serving import ServeApp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(port: int, path: str, bodies: list[bytes], start: int, n: int, out: list[dict]) -> None:
    """``n`` requests to ``path`` one after another on one keep-alive connection, from ``bodies[start]`` on."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for k in range(n):
        body = bodies[(start + k) % len(bodies)]
        t0 = time.perf_counter()
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
            answer = connection.getresponse()
            raw = answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException) as err:
            out.append({"ms": (time.perf_counter() - t0) * 1000, "ok": False, "error": f"{type(err).__name__}: {err}"})
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            continue
        ms = (time.perf_counter() - t0) * 1000
        timing = json.loads(raw)["timing"] if status == 200 else {}
        out.append({"ms": ms, "ok": status == 200, "error": "" if status == 200 else raw[:200].decode(errors="replace"), **timing})
    connection.close()


def load(port: int, path: str, bodies: list[bytes], clients: int, requests: int) -> tuple[pd.DataFrame, float]:
    """``clients`` closed-loop clients x ``requests`` each: one row per request, and the wall time."""
    results: list[list[dict]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=client, args=(port, path, bodies, c * 7, requests, results[c])) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pd.DataFrame([r for per in results for r in per]), time.perf_counter() - t0


def summarize(rows: pd.DataFrame, wall: float) -> dict:
    """Requests/s over the pooled rounds, latency percentiles, errors, and where a request's time goes
    (medians: in the replica, reading + decoding the body, its batch's forward pass)."""
    ms = rows["ms"].to_numpy()
    ok = rows[rows["ok"]]
    return {"requests": len(rows), "req/s": len(rows) / wall, "p50 ms": np.percentile(ms, 50), "p95 ms": np.percentile(ms, 95),
            "p99 ms": np.percentile(ms, 99), "errors": int((~rows["ok"]).sum()), "mean batch": ok["batch_size"].mean(),
            "server ms": ok["server_ms"].median(), "decode ms": ok["decode_ms"].median(), "model ms": ok["model_ms"].median()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint to serve (default: a random-weight one)")
    parser.add_argument("--limit", type=int, default=100, help="distinct NIH 1024x1024 originals sent (cycled)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of on/off loads")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--cpus-per-replica", type=float, default=0.5)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    args = parser.parse_args()
    import logging

    from ray import serve

    from evaluation.serve import build_app

    files = originals(args.limit)
    if len(files) < 96 and args.checkpoint is None:
        raise SystemExit(f"need at least 96 NIH 1024x1024 originals, found {len(files)}")
    bodies = [f.read_bytes() for f in files]
    pooled: dict[tuple[str, int], list[tuple[pd.DataFrame, float]]] = {}
    load_averages = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=args.cpus):
        checkpoint = args.checkpoint or make_checkpoint(Path(tmp) / "ckpt", args.backbone, args.image_size, files)
        port = free_port()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in ("on", "off"):
            settings = ServeApp(checkpoint=str(checkpoint), max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                                batching=mode == "on", cpus_per_replica=args.cpus_per_replica)
            serve.run(build_app(settings), name=f"cxr-{mode}", route_prefix=f"/{mode}")
            load(port, f"/{mode}/predict", bodies, 2, 5)  # warm: connections, the first passes
        print(f"deployed /on/predict and /off/predict on 127.0.0.1:{port}", flush=True)
        for r in range(args.rounds):
            for clients in (1, args.clients):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    rows, wall = load(port, f"/{mode}/predict", bodies, clients, args.requests)
                    pooled.setdefault((mode, clients), []).append((rows, wall))
                    errors = int((~rows["ok"]).sum())
                    print(f"round {r + 1}, batching {mode}, {clients} client(s): {len(rows) / wall:.1f} req/s, errors {errors}"
                          + (f" (first: {rows.loc[~rows['ok'], 'error'].iloc[0]})" if errors else ""), flush=True)
            load_averages.append(os.getloadavg()[0])
    table = pd.DataFrame([{"server batching": mode, "clients": clients,
                           **summarize(pd.concat([rows for rows, _ in runs]), sum(wall for _, wall in runs))}
                          for (mode, clients), runs in sorted(pooled.items(), key=lambda kv: (kv[0][0] == "off", kv[0][1]))])
    rate = table.set_index(["server batching", "clients"])["req/s"]
    per_round = {c: [len(on[0]) / on[1] / (len(off[0]) / off[1]) for on, off in zip(pooled[("on", c)], pooled[("off", c)])]
                 for c in (1, args.clients)}
    print(f"\n{len(files)} NIH 1024x1024 originals as bodies; {'checkpoint ' + str(args.checkpoint) if args.checkpoint else args.backbone} "
          f"at {args.image_size}x{args.image_size}; 1 replica x {args.cpus_per_replica:g} CPU per application, max batch "
          f"{args.max_batch_size}, wait {args.batch_wait_ms:g} ms; {args.cpus} CPUs; {args.rounds} alternating rounds; "
          f"load average {min(load_averages):.1f}-{max(load_averages):.1f}\n")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    for c in (1, args.clients):
        print(f"batching on / off at {c} client(s): {rate[('on', c)] / rate[('off', c)]:.2f}x requests/s pooled; per round "
              + ", ".join(f"{x:.2f}" for x in per_round[c]))
    print(f"errors: {int(table['errors'].sum())}")


if __name__ == "__main__":
    main()
