"""Scale-out on Ray (`pip install "qwen2vl[ray]"`): batch jobs on Ray Data, the server on Ray Serve.

Both run the same app `qwen2vl serve` runs, built on each worker from the command's settings (so the same limits
and media policy), with the model loaded once per worker.
- `qwen2vl batch ... --ray [ADDRESS]`: the driver reads INPUT and OUTPUT as a local job does (the same error lines
  and resume rules), Ray Data sends the pending requests to model actors, and their answers stream back to the
  driver, which writes each as it arrives.
- `qwen2vl serve --ray [ADDRESS] --replicas N`: N replicas behind Ray Serve's HTTP proxy; every response names its
  replica in the X-Qwen2VL-Replica header.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from .batch import Line, Results, app_client, pending, requests, respond
from .server.app import build_app
from .server.settings import ServerSettings


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray instance when there is none."""
    try:
        import ray
    except ImportError:
        raise ImportError('--ray needs Ray: pip install "qwen2vl[ray]"') from None
    ray.init(address=address or None, log_to_driver=False, configure_logging=False)


def worker_app(settings: ServerSettings, replica: str | None = None):
    """The server's app on a Ray worker, from the command's settings; torch uses the worker's CPUs."""
    import ray
    import torch

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)) or None
    if cpus:
        torch.set_num_threads(cpus)
    return build_app(settings, replica=replica)


class BatchActor:
    """A Ray Data actor: the app loaded once, then each batch of requests answered through it concurrently (the
    engine batches them)."""

    def __init__(self, settings: ServerSettings):
        self.app = worker_app(settings)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        async def answer_all():
            async with app_client(self.app) as client:
                return await asyncio.gather(*(
                    respond(client, Line(int(n), str(cid), None), json.loads(body))
                    for n, cid, body in zip(batch["line"], batch["custom_id"], batch["body"])))

        rows = asyncio.run(answer_all())
        return {"result": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object)}


def batch(settings: ServerSettings, input_path: Path, output_path: Path, address: str | None, actors: int | None,
          cpus_per_actor: int, progress: bool = True) -> dict[str, int]:
    """The batch job on Ray Data: the same OUTPUT, written by this driver as answers arrive."""
    import ray

    todo, skipped = pending(input_path, output_path)
    connect(address)
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor)
    with Results(output_path, len(todo), skipped, progress) as results:
        items = [{"line": line.number, "custom_id": line.custom_id, "body": json.dumps(json.loads(raw)["body"])}
                 for line, raw in requests(input_path, todo, results)]
        if items:
            answers = ray.data.from_items(items).map_batches(
                BatchActor, fn_constructor_kwargs={"settings": settings}, batch_size=4,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor, batch_format="numpy")
            for row in answers.iter_rows():  # streamed: each answer is written as it arrives
                results.write(json.loads(row["result"]))
    return results.counts


def serve(settings: ServerSettings, address: str | None, replicas: int, cpus_per_replica: int, host: str,
          port: int) -> None:
    """The app on Ray Serve with `replicas` replicas, until interrupted."""
    from ray import serve as ray_serve

    connect(address)

    def build():
        replica = ray_serve.get_replica_context().replica_id.unique_id
        return worker_app(settings, replica=replica)

    replica_class = type("Qwen2VLReplica", (), {"__doc__": "One copy of the qwen2vl server app."})
    deployment = ray_serve.deployment(ray_serve.ingress(build)(replica_class), name="qwen2vl",
                                      num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica})
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(deployment.bind(), name="qwen2vl", route_prefix="/")
    print(f"serving on http://{host}:{port} with {replicas} replica(s) on Ray", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop takes the deployment down with it
    try:
        while True:
            time.sleep(3600)
    finally:
        ray_serve.delete("qwen2vl")
