"""``python -m bench.profile [STREAMS RATE SECONDS]``: where the services spend CPU under load.

Starts the benchmark's stack, drives steady streams at it, and samples each
service with py-spy (``pip install -e '.[bench]'``) for the same seconds.
Prints each process's functions by share of samples (self time, then the
inclusive time of our own code) and keeps the collapsed stacks for flame
graphs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from .__main__ import SMOKE, Bench, more_files


def summarize(collapsed: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "/work/" in frame or "services/" in frame or "shared/" in frame:
                inclusive[frame] += count
    lines = [f"  {total} samples; self:"]
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["  inclusive, our code:"]
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    streams, rate, seconds = (int(a) for a in (sys.argv[1:4] or ("50", "50", "10")))
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    with more_files(), ExitStack() as stack:
        bench = Bench(SMOKE, stack, out)
        bench.start()
        load = threading.Thread(
            target=bench.load,
            args=(bench.ours, "stream"),
            kwargs={"streams": streams, "rate": rate, "tokens": int((seconds + 4) * rate), "stagger_s": 1.0, "window_s": [2.0, seconds + 2.0]},
        )
        load.start()
        samplers = {
            name: subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration", str(seconds),
                 "--rate", "200", "--format", "raw", "--output", str(out / f"{name}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for name, pid in bench.ours.pids.items()
            if name in ("gateway", "worker", "buffer")
        }
        for sampler in samplers.values():
            sampler.wait()
        load.join()
    for name in samplers:
        print(f"{name}:\n{summarize(out / f'{name}.txt')}\n")
    print(f"collapsed stacks in {out}")


if __name__ == "__main__":
    main()
