-- 007: why a running job waits, for `fanoutctl status`.
--
-- A job whose page Redis refuses (a key of the wrong type, replicas that do not
-- acknowledge) waits and retries by itself; its worker writes the reason, naming the key and
-- the fix, with every lease renewal and clears it when the job moves again or ends. NULL:
-- the job is not waiting.
ALTER TABLE fanout.jobs ADD COLUMN IF NOT EXISTS waiting_reason text;
