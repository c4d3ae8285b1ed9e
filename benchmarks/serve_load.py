"""`ldm serve` under load, against a server on 127.0.0.1 with the bundled model (a subprocess, spoken to over HTTP):

1. overhead: the same image through the server and by the same `Pipeline` call in one process (what `ldm generate`
   runs), in turns (A B A B ...), so drift hits both alike; goal under 5 %;
2. a burst of N concurrent requests (N = 4 x --max-queue + 4): every accepted one answers a decodable PNG of the
   asked size, every refused one a 429 with Retry-After, nothing hangs; throughput and p50/p95 latency;
3. memory: the server's resident memory after 10 and after --requests sequential requests; goal within 5 %;
4. an interrupted request (`POST /api/v1/interrupt`) and one whose client goes away free their slot within about
   one sampling step.

    python benchmarks/serve_load.py [--steps 20] [--requests 200] [--max-queue 4] [--pairs 8]

Prints the figures with the host's CPU flags; exits 1 when a check fails (tests/serving/test_load.py runs it small).
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small green triangle in the center"


def resident(pid: int) -> float:
    """Resident MiB of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Run:
    """The server under test and the checks that failed."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.failed = args, []
        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = subprocess.Popen(
            [sys.executable, "-m", "latent_diffusion.cli", "serve", "--model", args.model, "--port",
             self.url.rsplit(":", 1)[1], "--max-queue", str(args.max_queue)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.body = {"prompt": PROMPT, "steps": args.steps, "seed": 0, "sampler": "DPM++ 2M"}
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{self.url}/api/v1/models").raise_for_status()
                break
            except httpx.TransportError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {self.server.stderr.read()}") from None
                time.sleep(0.1)

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failed.append(what)

    def post(self, timeout: float = 600, client: httpx.Client | None = None, **fields) -> httpx.Response:
        return (client or httpx).post(f"{self.url}/api/v1/generate", json={**self.body, **fields}, timeout=timeout)

    def progress(self, task: str) -> dict:
        return httpx.get(f"{self.url}/api/v1/progress", params={"task_id": task, "preview": False}).json()

    def overhead(self) -> float:
        """Median seconds of a served image; prints the overhead against the direct call."""
        from latent_diffusion.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(self.args.model, device="cpu")
        self.post().raise_for_status()  # warm: the server loads the model on its first job
        pipe(PROMPT, steps=self.args.steps, seed=0, sampler="dpmpp_2m", progress=False)
        direct, served = [], []
        with httpx.Client() as client:  # one connection, as a client that sends more than one request keeps
            for i in range(self.args.pairs):
                start = time.perf_counter()
                pipe(PROMPT, steps=self.args.steps, seed=i, sampler="dpmpp_2m", progress=False)
                direct.append(time.perf_counter() - start)
                time.sleep(0.05)  # this process's OpenMP threads stop spinning before the server computes
                start = time.perf_counter()
                self.post(seed=i, client=client).raise_for_status()
                served.append(time.perf_counter() - start)
                time.sleep(0.05)
        d, s = statistics.median(direct), statistics.median(served)
        print(f"\n1. one image, {self.args.steps} steps: in one process {d * 1000:.1f} ms, served {s * 1000:.1f} ms "
              f"(medians of {self.args.pairs} in turns): overhead {100 * (s / d - 1):+.1f} % (goal < 5 %)")
        return s

    def burst(self) -> None:
        n = 4 * self.args.max_queue + 4
        replies: list = [None] * n  # (the response or what went wrong, seconds)

        def send(i: int) -> None:
            start = time.perf_counter()
            try:
                replies[i] = (self.post(timeout=300, seed=i, width=64, height=48), time.perf_counter() - start)
            except httpx.HTTPError as exc:
                replies[i] = (exc, time.perf_counter() - start)

        began = time.perf_counter()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(330)
        took = time.perf_counter() - began
        replies = [reply or ("no answer", 0.0) for reply in replies]
        accepted = [(r, s) for r, s in replies if isinstance(r, httpx.Response) and r.status_code == 200]
        refused = [r for r, _ in replies if isinstance(r, httpx.Response) and r.status_code == 429]
        other = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r, _ in replies
                 if not (isinstance(r, httpx.Response) and r.status_code in (200, 429))]
        sizes = {Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png"]))).size for r, _ in accepted}
        latencies = [s for _, s in accepted]
        print(f"\n2. {n} requests at once, --max-queue {self.args.max_queue}: {len(accepted)} served in {took:.1f} s "
              f"({len(accepted) / took:.2f} images/s), {len(refused)} refused; latency of the served: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms")
        self.check(not any(t.is_alive() for t in threads) and not other, f"nothing hangs or fails ({other})")
        self.check(sizes == {(64, 48)}, f"every served image decodes at the asked size ({sizes})")
        self.check(bool(refused) and all(r.headers.get("retry-after") for r in refused),
                   "the requests beyond the queue are 429 with Retry-After")
        self.check(len(accepted) >= self.args.max_queue + 1, "at least the queue's length plus one are served")

    def memory(self) -> None:
        marks = {}
        for i in range(self.args.requests):
            self.post(seed=1000 + i, num_images=1 + i % 4).raise_for_status()
            if i + 1 in (10, self.args.requests // 2, self.args.requests):
                marks[i + 1] = resident(self.server.pid)
        first, last = marks[10], marks[self.args.requests]
        print("\n3. server resident memory: " + ", ".join(f"after {n} requests {m:.0f} MiB" for n, m in marks.items())
              + f" (1-4 images each): {100 * (last / first - 1):+.1f} % from 10 to {self.args.requests}")
        self.check(last <= first * 1.05, "memory after the last request within 5 % of after 10")

    def slots(self) -> None:
        """Seconds from an interrupt (or a client leaving) until its job is gone, against one step's time."""
        long = {"steps": 900, "num_images": 2}
        reply: dict = {}
        thread = threading.Thread(target=lambda: reply.update(r=self.post(task_id="interrupted", **long)))
        thread.start()
        step = self.step_seconds("interrupted")
        before = self.progress("interrupted")["step"]
        start = time.perf_counter()
        httpx.post(f"{self.url}/api/v1/interrupt", params={"task_id": "interrupted"})
        interrupted, last = self.gone("interrupted", start)
        thread.join(60)
        try:
            self.post(timeout=1.5, task_id="left", **long)
            left = float("inf")
        except httpx.ReadTimeout:  # the client gives up and closes its connection
            left = self.gone("left", time.perf_counter())[0]
        print(f"\n4. one sampling step of 2 images takes {step * 1000:.0f} ms; an interrupted job's slot is free "
              f"{interrupted * 1000:.0f} ms after the interrupt (steps seen: {before} before it, {last} last), that "
              f"of a job whose client left {left * 1000:.0f} ms after it left (the server looks every 250 ms)")
        self.check(reply["r"].status_code == 409, "the interrupted request answers 409")
        # counted in steps, not milliseconds: this client's polling shares the cores with the server it measures
        self.check(last - before <= 2, "an interrupted job stops within a step of the interrupt (the step it was "
                                       "on, plus one for the progress read just before it)")
        self.check(left <= 2 * step + 0.3, "a job whose client left stops within one step of the server noticing")

    def step_seconds(self, task: str) -> float:
        """Seconds per step of the running job `task`, over 5 steps after its third."""
        deadline = time.monotonic() + 60
        while (first := self.progress(task))["step"] < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job {task} did not start")
            time.sleep(0.005)
        start = time.perf_counter()
        while (now := self.progress(task))["step"] < first["step"] + 5:
            time.sleep(0.005)
        return (time.perf_counter() - start) / (now["step"] - first["step"])

    def gone(self, task: str, since: float) -> tuple[float, int]:
        """Seconds from `since` until the server no longer knows the job `task`, and the last step it reported."""
        last = 0
        while (progress := self.progress(task))["state"] != "unknown":
            last = max(last, progress["step"])
            time.sleep(0.005)
        return time.perf_counter() - since, last

    def close(self) -> None:
        self.server.terminate()
        self.server.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "ldm-shapes"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=8, help="direct/served pairs timed for the overhead")
    p.add_argument("--requests", type=int, default=200, help="sequential requests watched for memory (>= 20)")
    p.add_argument("--max-queue", type=int, default=4)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from harness import machine

    torch.set_grad_enabled(False)
    print(machine())
    run = Run(args)
    try:
        run.overhead()
        run.burst()
        run.memory()
        run.slots()
    finally:
        run.close()
    print(f"\n{len(run.failed)} checks failed" + (f": {'; '.join(run.failed)}" if run.failed else ""))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
