"""The corruption harness: garbage written over a busy table gives MPFlightError or recovers, never worse.

Every case builds one table (4 or 8 slots, so that random writes often hit live fields) in a realistic
state, writes garbage over it, and then uses every part of the API on it:

* process A ran a few quick calls (their slots are FREE again, with stale fields naming a live
  process), then owns the call for HELD, held open; a thread of A and processes B1, B2 wait on it;
* the calls for SMALL (fn raised: the outcome is inline) and BIG (a value in a result segment) are
  DONE, each with one registered reader (R_small, R_big) stopped by SIGSTOP before it read;
* the runner writes garbage through its own mapping of ``/mpf4@NAME``: header fields (counters, dirty
  byte, geometry), state map, record map, home counts, slot fields, key and result areas (the msgpack
  payload of a published outcome), waiter records, runs of random bytes anywhere, or BIG's segment;
* then new processes attach and use the API (N: inflight, stats, gc, tables, forget, do on colliding
  and non-colliding keys; J joins HELD); A completes its call on the corrupted table (or, in a
  quarter of the cases, is killed, so that its call is aborted); the readers resume; and once all are
  done a last process (Z) attaches, collects and calls again.

Each actor (a thread or process that uses the API) must return, or raise MPFlightError, or what its
role documents: TimeoutError for a handle with a timeout, the owner's exception for the reader of an
error. Any other exception (a MemoryError under the address-space limit AS_LIMIT included), a death by
signal, or an actor still busy HARD seconds after the corruption is a failure. A keeps living after
its call, as a worker does, so a waiter that only its owner's death would release counts as hung.
Failures are reported deduplicated by where they happen, with the seed, case, the bytes written and
a traceback (faulthandler's dump for a hang or a crash); ``python -m tests.fuzz.corruption SEED CASE``
runs one case again. tests/test_corruption.py holds the tests: the seeded random cases, and PINNED,
which replays the smallest garbage found for each distinct failure.

One subprocess per test (the driver, under RLIMIT_AS) forks a runner per case, PARALLEL at a time,
and each runner forks the actors' processes: forks of an interpreter that has imported everything,
so a case costs milliseconds of process start rather than a new interpreter per process. Each runner
unlinks its case's group (named NAME.CASE after the test's ``name``, so the fixture's check of
/dev/shm covers it): the segments a corruption orphans go with it, and no test is marked
leaves_segments.

The modules: ``scene`` (the keys, values and bounds of a case), ``garbage`` (what a case writes),
``mapping`` (the runner's own view of a table), ``actors`` (the roles), ``case`` (one case, as a
runner runs it) and ``corruption`` (the driver, the report and ``main``).
"""
