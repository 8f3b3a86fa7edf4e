#!/usr/bin/env python3
"""Samples how much CPU the machine spends outside the load test, for the scenario charts.

    python3 loadtest/cpu_sampler.py OUTFILE SECONDS INTERVAL PID...

Every INTERVAL seconds, for SECONDS seconds, appends one line to OUTFILE:
`seconds-since-start  busy-ticks  our-ticks`. busy-ticks is the machine's busy time from
/proc/stat (user+nice+system+irq+softirq+steal, all CPUs); our-ticks adds up the utime+stime
growth of the given processes (the load test's own: proxies, backends, Consul, oha) and of this
sampler. A process that exits simply stops adding, so its CPU time neither vanishes nor is
counted twice. report.py turns the differences into "cores used by other processes". Short
curl calls of the script are not followed (a few milliseconds each). Standard library only.
"""

import os
import sys
import time


def machine_busy():
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def process_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])         # fields 14, 15: utime, stime


def main():
    out, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    pids = [int(p) for p in sys.argv[4:]] + [os.getpid()]
    previous = {pid: process_ticks(pid) for pid in pids}
    ours = 0
    start = time.monotonic()
    with open(out, "w") as sink:
        while True:
            now = time.monotonic() - start
            for pid in pids:
                ticks = process_ticks(pid)
                if ticks is not None and previous[pid] is not None:
                    ours += max(0, ticks - previous[pid])
                previous[pid] = ticks
            sink.write(f"{now:.3f}\t{machine_busy()}\t{ours}\n")
            sink.flush()
            if now >= seconds:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - start - now)))


if __name__ == "__main__":
    main()
