"""Test-process set-up shared by every test file: tqdm's threads and locks stay in one process.

mutmut runs the tests once in its own process and then forks one worker per mutant from it, so
whatever tqdm set up in that process is shared by every worker:

* tqdm's default write lock holds a ``multiprocessing`` lock, a semaphore shared by every
  process forked after it was made. A bar that fails while it draws (``x_train__mutmut_281`` of
  ``trainer.py``: ``unit=None``) leaves that lock taken, and the worker's exit does not release
  it: every later worker then waited for it at its first progress bar (a futex wait, 0 s CPU,
  until mutmut's time-out). A lock of this process only (``threading.RLock``) dies with it.
* tqdm's monitor thread wakes every 10 s and takes that lock; it outlives the tests, and a
  worker forked while it held the lock would wait the same way. The monitor only re-draws bars
  that wait too long to print; no test looks at it, so it is off.
"""

import threading

from tqdm import std

std.tqdm.monitor_interval = 0
std.tqdm.set_lock(threading.RLock())
