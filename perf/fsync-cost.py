#!/usr/bin/env python3
# What one spool-writer tick costs the kernel on this machine, apart from the proxy: the calling
# thread's CPU time (thread_time_ns) for one write() of SIZE bytes and one fdatasync(), N ticks
# 50 ms apart, as the writer does (perf/RESULTS.md §15.1). MODE is "append" (a fresh file grown
# by each write, as the spool does), "prezero" (a file written with zeros and fsynced first,
# then overwritten in place — what recycling segments would give) or "fallocate" (the file's
# blocks reserved with posix_fallocate first, then written in place), each with "-nosync" to
# leave out the fdatasync. The file lives in DIR (default /tmp) and is removed afterwards.
#
#   python3 perf/fsync-cost.py append 60 28000
#   python3 perf/fsync-cost.py prezero 60 28000 /var/lib/ibex   # MODE N SIZE [DIR]
import os, sys, time

mode = sys.argv[1]; n = int(sys.argv[2]); size = int(sys.argv[3])
path = os.path.join(sys.argv[4] if len(sys.argv) > 4 else "/tmp", "ibex-fsync-cost.seg")
buf = os.urandom(size)
if os.path.exists(path): os.unlink(path)
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
if mode.startswith("prezero"):
    os.write(fd, b"\0" * (n * size + 4096)); os.fsync(fd); os.lseek(fd, 0, 0)
elif mode.startswith("fallocate"):
    os.posix_fallocate(fd, 0, n * size + 4096); os.fsync(fd)
tw = ts = 0
for _ in range(n):
    a = time.thread_time_ns()
    os.write(fd, buf)
    b = time.thread_time_ns()
    if not mode.endswith("nosync"): os.fdatasync(fd)
    c = time.thread_time_ns()
    tw += b - a; ts += c - b
    time.sleep(0.05)
print(mode, size, "write us", tw / n / 1000, "sync us", ts / n / 1000)
os.close(fd); os.unlink(path)
