-- 008: what the server decides, not the producer; who a worker is; what a crash costs.
--
-- Events are stamped by the server: whatever a producer's INSERT says, the id comes from
-- the sequence and created_at is now(). A producer's INSERT grant used to let it choose
-- both (an id of -7 or 2^63-1, a created_at of 'infinity' that made the job's finish record
-- fail forever). RETURNING id still tells the producer the id it got.
--
-- fanout.workers learns where each worker runs (host, pid), so that a second process
-- configured with a worker_id that a live one holds is refused with a message naming it.
--
-- jobs.lease_losses counts the claims of a job whose holder vanished (crashed, killed,
-- stalled past its lease) apart from the attempts that failed with an error: a crash says
-- little about the event, so it has its own, higher limit (max_lease_losses), and a job
-- that made progress since the last loss starts counting again.
CREATE OR REPLACE FUNCTION fanout.events_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    NEW.id := nextval('fanout.events_id_seq');
    NEW.created_at := now();
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION fanout.events_stamp() FROM PUBLIC;

DROP TRIGGER IF EXISTS events_stamp ON fanout.events;
CREATE TRIGGER events_stamp BEFORE INSERT ON fanout.events
    FOR EACH ROW EXECUTE FUNCTION fanout.events_stamp();

ALTER TABLE fanout.workers ADD COLUMN IF NOT EXISTS host text;
ALTER TABLE fanout.workers ADD COLUMN IF NOT EXISTS pid integer;

ALTER TABLE fanout.jobs ADD COLUMN IF NOT EXISTS lease_losses integer NOT NULL DEFAULT 0;
