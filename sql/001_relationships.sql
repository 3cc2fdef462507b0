-- 001: the example Relationship schema, as its owning team would keep it.
--
-- This schema belongs to the Relationship service, not to fanout. It stands in for a real
-- deployment's tables; fanout never reads it directly, only through the contract view
-- (002). The primary key (followee_id, follower_id) is the index that serves "followers of X
-- in id order", which is what keeps fanout's keyset pages index-only.
CREATE SCHEMA IF NOT EXISTS relationships;

CREATE TABLE IF NOT EXISTS relationships.follows (
    followee_id bigint      NOT NULL CHECK (followee_id > 0),
    follower_id bigint      NOT NULL CHECK (follower_id > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (followee_id, follower_id)
);

-- A follower who muted an author gets no notifications from that author.
CREATE TABLE IF NOT EXISTS relationships.mutes (
    muter_id   bigint      NOT NULL,
    muted_id   bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (muter_id, muted_id)
);

-- A block in either direction stops notifications between the two accounts.
CREATE TABLE IF NOT EXISTS relationships.blocks (
    blocker_id bigint      NOT NULL,
    blocked_id bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker_id, blocked_id)
);
