-- 004: least-privilege roles.
--
-- fanout_worker (fanoutd): reads the contract view, reads events, updates jobs. It has no
-- privilege on any Relationship table: the view runs with its owner's rights.
-- fanout_publisher (producers): inserts events, directly or through fanout.publish(); it
-- cannot read follows or jobs.
-- Both are NOLOGIN group roles; a deployment grants them to its login roles.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fanout_worker') THEN
        CREATE ROLE fanout_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fanout_publisher') THEN
        CREATE ROLE fanout_publisher NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA relationships TO fanout_worker;
GRANT SELECT ON relationships.notification_recipients TO fanout_worker;
GRANT USAGE ON SCHEMA fanout TO fanout_worker;
GRANT SELECT ON fanout.events TO fanout_worker;
GRANT SELECT, UPDATE ON fanout.jobs TO fanout_worker;
GRANT SELECT ON fanout.schema_migrations TO fanout_worker;

GRANT USAGE ON SCHEMA fanout TO fanout_publisher;
GRANT INSERT ON fanout.events TO fanout_publisher;
GRANT USAGE ON SEQUENCE fanout.events_id_seq TO fanout_publisher;
REVOKE ALL ON FUNCTION fanout.publish(bigint, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fanout.publish(bigint, text, jsonb) TO fanout_publisher;
REVOKE ALL ON FUNCTION fanout.events_enqueue() FROM PUBLIC;
