-- 009: a claim reads only the jobs it may take; fewer index entries per job.
--
-- jobs_unfinished (next_attempt_at, id) WHERE state IN ('pending', 'running') held every job
-- this worker runs, so every claim walked past all of them (up to max_jobs rows and their
-- heap tuples, each checked against the arrays of jobs held) before it reached a pending one.
-- The claim now reads pending jobs in claim order from jobs_pending, and running jobs only
-- when their lease has expired, from jobs_running by lease end (fanout/store.c, SQL_CLAIM).
-- Readers of "pending or running" write `state = 'pending' OR state = 'running'`, which the
-- planner serves with a BitmapOr of the two.
--
-- fillfactor 70: a job's row is updated three or four times within a second of its insert
-- (claimed, its mark recorded, done); room on its page keeps the new versions there (and the
-- updates that touch no indexed column HOT) instead of spreading them over fresh pages.
-- It applies to pages written from now on.
DROP INDEX IF EXISTS fanout.jobs_unfinished;
CREATE INDEX IF NOT EXISTS jobs_pending ON fanout.jobs (next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS jobs_running ON fanout.jobs (lease_until)
    WHERE state = 'running';
ALTER TABLE fanout.jobs SET (fillfactor = 70);
