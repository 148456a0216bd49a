"""Summarise a py-spy collapsed-stack profile (`bench.throughput --profile`): where each process spends time.

    python -m bench.profile_summary PROFILE.txt [--top 25] [--match lmdeploy]

Prints, per process, its share of samples and the functions with the most samples inclusive (anywhere on
the stack) and exclusive (the frame on top), idle waits (`select`, `epoll`, `wait`, `sleep`) marked as such.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict

IDLE = re.compile(r"^(select|poll|epoll_wait|wait|_wait|sleep|acquire|get|_recv|recv|read|accept|_worker|park)\b|"
                  r"\((selectors|threading|queue|socket|multiprocessing/connection)\.py")


def parse(lines):
    """{process: Counter(stack tuple -> samples)} from py-spy's raw format (`frame;frame;... count`)."""
    out: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        process = frames[0].split(":")[0] if frames[0].startswith("process ") else "?"
        out[process][tuple(frames[1:])] += int(count)
    return out


def summarise(stacks: Counter, top: int, match: str | None) -> list[str]:
    total = sum(stacks.values())
    inclusive: Counter = Counter()
    exclusive: Counter = Counter()
    for frames, n in stacks.items():
        names = [f for f in frames if f and f != '""']
        for name in set(names):
            if match is None or match in name:
                inclusive[name] += n
        if names:
            exclusive[names[-1]] += n
    lines = ["  inclusive:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("  exclusive (top of stack):")
    lines += [f"    {100 * n / total:5.1f}%  {name}{'  [idle]' if IDLE.search(name) else ''}"
              for name, n in exclusive.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default=None, help="only functions whose frame text contains this")
    p.add_argument("--min-share", type=float, default=5.0, help="skip processes under this share of samples (%%)")
    a = p.parse_args(argv)
    with open(a.profile) as f:
        processes = parse(f)
    grand = sum(sum(c.values()) for c in processes.values())
    for process, stacks in sorted(processes.items(), key=lambda kv: -sum(kv[1].values())):
        share = 100 * sum(stacks.values()) / grand
        if share < a.min_share:
            continue
        print(f"{process}: {share:.1f}% of samples")
        print("\n".join(summarise(stacks, a.top, a.match)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
