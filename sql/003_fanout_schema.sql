-- 003: fanout's own schema: the events outbox and the job state.
--
-- A producer inserts into fanout.events inside its own transaction (the outbox pattern) or
-- calls fanout.publish(). A trigger creates the event's job and sends a NOTIFY on channel
-- fanout_events; the NOTIFY is only a wake-up hint (fanoutd also polls), so it can be lost
-- or switched off without losing an event.
--
-- jobs.token is the fencing token: every claim increments it, and Redis refuses page writes
-- that carry an older token than the newest one it has seen for the job.
CREATE SCHEMA IF NOT EXISTS fanout;

CREATE TABLE IF NOT EXISTS fanout.events (
    id         bigserial   PRIMARY KEY,
    author     bigint      NOT NULL CONSTRAINT events_author_positive CHECK (author > 0),
    kind       text        NOT NULL CONSTRAINT events_kind_valid
                           CHECK (kind ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    payload    jsonb       NOT NULL DEFAULT '{}'::jsonb
                           CONSTRAINT events_payload_size CHECK (octet_length(payload::text) <= 65536),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS fanout.jobs (
    id              bigserial   PRIMARY KEY,
    event_id        bigint      NOT NULL REFERENCES fanout.events (id) ON DELETE CASCADE,
    -- follower ids in (range_lo, range_hi]; range_hi NULL means no upper bound
    range_lo        bigint      NOT NULL DEFAULT 0,
    range_hi        bigint,
    state           text        NOT NULL DEFAULT 'pending'
                                CONSTRAINT jobs_state_valid
                                CHECK (state IN ('pending', 'running', 'done', 'dead')),
    lease_owner     text,
    lease_until     timestamptz,
    token           bigint      NOT NULL DEFAULT 0,
    -- last follower id written to Redis, as last checkpointed (Redis holds the exact mark)
    progress        bigint      NOT NULL DEFAULT 0,
    delivered       bigint      NOT NULL DEFAULT 0,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

-- Claims scan only unfinished jobs.
CREATE INDEX IF NOT EXISTS jobs_unfinished ON fanout.jobs (next_attempt_at, id)
    WHERE state IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS jobs_event ON fanout.jobs (event_id);

CREATE OR REPLACE FUNCTION fanout.events_enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO fanout.jobs (event_id) VALUES (NEW.id);
    PERFORM pg_notify('fanout_events', NEW.id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS events_enqueue ON fanout.events;
CREATE TRIGGER events_enqueue AFTER INSERT ON fanout.events
    FOR EACH ROW EXECUTE FUNCTION fanout.events_enqueue();

-- The producers' entry point: validates and inserts one event, returns its id.
CREATE OR REPLACE FUNCTION fanout.publish(p_author bigint, p_kind text, p_payload jsonb)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    new_id bigint;
BEGIN
    IF p_author IS NULL OR p_author <= 0 THEN
        RAISE EXCEPTION 'author must be a positive id, got %', p_author
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_kind IS NULL OR p_kind !~ '^[A-Za-z0-9_.:-]{1,64}$' THEN
        RAISE EXCEPTION 'kind must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, got %', p_kind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(coalesce(p_payload, '{}'::jsonb)::text) > 65536 THEN
        RAISE EXCEPTION 'payload is % bytes, the limit is 65536', octet_length(p_payload::text)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO fanout.events (author, kind, payload)
    VALUES (p_author, p_kind, coalesce(p_payload, '{}'::jsonb))
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;
