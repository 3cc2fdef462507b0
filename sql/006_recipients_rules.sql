-- 006: more of "who is notified", still decided in the contract view alone.
--
-- The Relationship owner adds two rules: a follow can have notifications switched off
-- (follows.notify), and a deactivated account (accounts.deactivated_at set) is notified of
-- nothing. fanout's code does not change: the view changes, its columns stay
-- (author bigint, follower bigint), and the page query stays an index range scan on follows'
-- primary key with anti-joins on small, indexed tables (fanoutctl check-db verifies it).
ALTER TABLE relationships.follows
    ADD COLUMN IF NOT EXISTS notify boolean NOT NULL DEFAULT true;

-- Accounts as far as notifications care; an account without a row here is active.
CREATE TABLE IF NOT EXISTS relationships.accounts (
    id             bigint      PRIMARY KEY CHECK (id > 0),
    deactivated_at timestamptz
);

-- The view's anti-join needs only the deactivated few: a small index, whatever the number of
-- accounts.
CREATE INDEX IF NOT EXISTS accounts_deactivated ON relationships.accounts (id)
    WHERE deactivated_at IS NOT NULL;

CREATE OR REPLACE VIEW relationships.notification_recipients AS
SELECT f.followee_id AS author,
       f.follower_id AS follower
FROM relationships.follows f
WHERE f.notify
  AND NOT EXISTS (SELECT 1 FROM relationships.accounts a
                  WHERE a.id = f.follower_id AND a.deactivated_at IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM relationships.mutes m
                  WHERE m.muter_id = f.follower_id AND m.muted_id = f.followee_id)
  AND NOT EXISTS (SELECT 1 FROM relationships.blocks b
                  WHERE b.blocker_id = f.followee_id AND b.blocked_id = f.follower_id)
  AND NOT EXISTS (SELECT 1 FROM relationships.blocks b
                  WHERE b.blocker_id = f.follower_id AND b.blocked_id = f.followee_id);

COMMENT ON VIEW relationships.notification_recipients IS
    'fanout contract: author bigint, follower bigint; followers of author to notify';
