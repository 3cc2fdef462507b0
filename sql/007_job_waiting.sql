-- 007: why a running job waits, for `fanoutctl status`; whether its progress mark exists.
--
-- A job whose page Redis refuses (a key of the wrong type, replicas that do not
-- acknowledge) waits and retries by itself; its worker writes the reason, naming the key and
-- the fix, with every lease renewal and clears it when the job moves again or ends. NULL:
-- the job is not waiting.
ALTER TABLE fanout.jobs ADD COLUMN IF NOT EXISTS waiting_reason text;

-- Set by the worker once the job's progress mark exists in Redis, before its first page is
-- written: from then on a missing mark means it was lost (deleted, evicted, a failover), and
-- fanoutd stops the job instead of creating a fresh mark and writing the range again.
ALTER TABLE fanout.jobs ADD COLUMN IF NOT EXISTS mark_created boolean NOT NULL DEFAULT false;
