-- 010: the index of running jobs by lease end serves the claim only.
--
-- jobs_running (009) was a partial index WHERE state = 'running', so the statements that
-- update jobs by id from arrays (the marks' records, the done records, the lease renewals:
-- "... WHERE j.id = u.id AND j.token = u.token AND j.state = 'running'") could read it, and
-- their plans did: a bitmap scan of every running job (up to max_jobs of each worker) joined
-- by hash with the array, on every call, instead of one primary-key lookup per element. Its
-- predicate now also says lease_until IS NOT NULL, which the claim's "lease_until < now()"
-- implies and those statements do not, so they go by primary key.
DROP INDEX IF EXISTS fanout.jobs_running;
CREATE INDEX IF NOT EXISTS jobs_lease_ends ON fanout.jobs (lease_until)
    WHERE state = 'running' AND lease_until IS NOT NULL;
