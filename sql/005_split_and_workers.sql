-- 005: what fanoutd needs to split large fan-outs and to report its state.
--
-- A worker that claims a new job for an author with a wide follower-id span splits it into
-- follower-id ranges (more rows in fanout.jobs) that several workers run in parallel.
-- fanout.workers holds one row per running fanoutd: last seen, jobs, and why it pauses
-- (backpressure), for `fanoutctl status`.
GRANT INSERT ON fanout.jobs TO fanout_worker;
GRANT USAGE ON SEQUENCE fanout.jobs_id_seq TO fanout_worker;

CREATE TABLE IF NOT EXISTS fanout.workers (
    worker_id     text        PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now(),
    jobs          integer     NOT NULL DEFAULT 0,
    paused_reason text
);
GRANT SELECT, INSERT, UPDATE ON fanout.workers TO fanout_worker;
