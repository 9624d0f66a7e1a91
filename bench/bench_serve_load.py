"""Bounded load on `hone serve` over loopback: N concurrent clients send a fixed number of chat requests.

It starts the server itself (the embedded model by default, or `--model`), waits for /health, warms it up, then
sends `--requests` chat completions from `--clients` concurrent clients, each request a sentiment question about
an SST-2 review (built-in sentences when the data set is absent) with `--max-tokens` new tokens at temperature 0.
It prints requests per second, p50/p95/max latency, completion tokens per second, the mean batch the server ran,
and the error count (target: zero). With several `--batch-sizes` it restarts the server for each, which shows what
batching buys (1 = every request runs alone). It prints figures; it asserts nothing.

    python bench/bench_serve_load.py [--model smollm2-135m-instruct] [--clients 8] [--requests 64]
                                     [--max-tokens 32] [--batch-sizes 16,1] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"]
FALLBACK = ["a gripping, funny and warm film.", "dull, lifeless and far too long.", "the best thing all year.",
            "i wanted to leave after ten minutes.", "a quiet, moving story told with care.",
            "loud, messy and strangely boring.", "the actors seem to be having fun, and so did i.",
            "not even the music can save it."]


def reviews(n: int) -> list[str]:
    for root in DATA_CANDIDATES:
        path = root / "sst2" / "validation.jsonl"
        if path.exists():
            rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
            return rows[:n]
    return (FALLBACK * (n // len(FALLBACK) + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, args, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    command = [sys.executable, "-m", "honellm", "serve", model, "--port", str(port), "--log-level", "warning",
               "--max-batch-size", str(args.batch_size), "--max-concurrency", str(max(64, 2 * args.clients)),
               "--max-tokens-limit", str(max(1024, args.max_tokens))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(base: str, process: subprocess.Popen, seconds: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        while True:
            if process.poll() is not None:
                sys.exit(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if (await client.get(f"{base}/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"the server did not answer /health within {seconds:.0f} s:\n{log_path.read_text()}")
            await asyncio.sleep(0.25)


async def one_request(client, base: str, model: str, review: str, args) -> tuple[float, int, int]:
    """(latency in s, HTTP status or 0 for a transport error, completion tokens)."""
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": "Classify the sentiment of the movie review as positive or "
                                                       "negative, then say why in one sentence."},
                         {"role": "user", "content": f"Review: {review}"}]}
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        if args.stream:
            tokens, status = 0, 0
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            status = 0
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            return time.perf_counter() - start, status, tokens
        response = await client.post(f"{base}/v1/chat/completions", json=body)
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return time.perf_counter() - start, response.status_code, tokens
    except Exception:  # noqa: BLE001 - a transport error is an error to count, not a crash of the bench
        return time.perf_counter() - start, 0, 0


async def load(base: str, model: str, args) -> dict:
    import httpx

    texts = reviews(args.requests)
    queue: asyncio.Queue = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    results: list[tuple[float, int, int]] = []
    limits = httpx.Limits(max_connections=args.clients)

    async def client_loop():
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            while not queue.empty():
                results.append(await one_request(client, base, model, queue.get_nowait(), args))

    async with httpx.AsyncClient(timeout=600) as warm:  # first requests pay one-off costs (kernels, caches)
        for text in texts[:2]:
            await one_request(warm, base, model, text, args)
        before = (await warm.get(f"{base}/health")).json()
    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    wall = time.perf_counter() - start
    async with httpx.AsyncClient() as probe:
        after = (await probe.get(f"{base}/health")).json()
    latencies = sorted(r[0] for r in results)
    batches = after["batches"] - before["batches"]
    return {
        "requests": len(results), "errors": sum(1 for r in results if r[1] != 200), "wall_s": wall,
        "rps": len(results) / wall, "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))], "max": latencies[-1],
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "mean_batch": (after["sequences"] - before["sequences"]) / batches if batches else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="artifact or model to serve")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--batch-sizes", default="16", help="server --max-batch-size values, one run each")
    parser.add_argument("--threads", type=int, default=None, help="server --threads (torch CPU threads)")
    parser.add_argument("--stream", action="store_true", help="stream every response (streams run one at a time)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args()

    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        args.batch_size = batch_size
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            log_path = Path(tmp) / "server.log"
            with open(log_path, "w") as log:
                process = start_server(args.model, port, args, log)
            try:
                base = f"http://127.0.0.1:{port}"
                started = time.perf_counter()
                asyncio.run(wait_ready(base, process, args.startup_timeout, log_path))
                print(f"server up in {time.perf_counter() - started:.1f} s (max batch {batch_size})", flush=True)
                import httpx

                model_name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]  # the name it serves under
                rows.append({"max_batch": batch_size, **asyncio.run(load(base, model_name, args))})
            finally:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()

    print(f"\nhone serve under load: {args.model}, {args.clients} clients, {args.requests} requests, "
          f"{args.max_tokens} new tokens each, temperature 0{', streamed' if args.stream else ''}; "
          f"{os.cpu_count()} CPUs, torch threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")
    header = f"{'max batch':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'tok/s':>7} {'mean batch':>10} {'errors':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['max_batch']:>9} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['max']:>7.2f} "
              f"{r['tokens_per_s']:>7.1f} {r['mean_batch']:>10.1f} {r['errors']:>6}")


if __name__ == "__main__":
    main()
