-- 002: the contract view: who is notified of author X's events.
--
-- Published by the Relationship owner for fanout. It is the only Relationship object fanout
-- reads, and the one place where "who gets notified" is decided: follows minus mutes and
-- blocks. The owner may change the tables behind it freely as long as the view keeps its
-- columns (author bigint, follower bigint) and stays cheap for
--   WHERE author = $1 AND follower > $2 ORDER BY follower LIMIT $3
-- (an index range scan on follows' primary key with anti-joins on the small tables).
CREATE OR REPLACE VIEW relationships.notification_recipients AS
SELECT f.followee_id AS author,
       f.follower_id AS follower
FROM relationships.follows f
WHERE NOT EXISTS (SELECT 1 FROM relationships.mutes m
                  WHERE m.muter_id = f.follower_id AND m.muted_id = f.followee_id)
  AND NOT EXISTS (SELECT 1 FROM relationships.blocks b
                  WHERE b.blocker_id = f.followee_id AND b.blocked_id = f.follower_id)
  AND NOT EXISTS (SELECT 1 FROM relationships.blocks b
                  WHERE b.blocker_id = f.follower_id AND b.blocked_id = f.followee_id);

COMMENT ON VIEW relationships.notification_recipients IS
    'fanout contract: author bigint, follower bigint; followers of author to notify';
