"""Test-process set-up shared by every test file.

tqdm's monitor thread is switched off for the whole session. The monitor wakes every 10 s and
takes tqdm's lock; it outlives the tests (it was still running at the end of the trainer tests).
mutmut runs the tests once in its own process and then forks one worker per mutant from it: a
fork while the monitor held the lock gave a worker a lock that nobody would release, and that
worker hung at its first progress bar (a futex wait, 0 s CPU; seen on g2b's first mutant and on
``x_train__mutmut_281`` of ``trainer.py``). The monitor only re-draws bars that wait too long to
print; no test looks at it.
"""

from tqdm import std

std.tqdm.monitor_interval = 0
