/*
 * store.c: the job store, fanout.jobs, as fanoutd uses it through the control connection.
 *
 * Claims: up to claim_batch jobs per query (FOR UPDATE SKIP LOCKED, token + 1, lease), one
 * query at a time, repeated until max_jobs run or nothing is claimable. A job claimed for the
 * first time whose first page comes back full may be split into follower-id ranges
 * (fod_store_split, SQL_SPLIT) before anything of it reaches Redis; a job whose audience fits
 * in one page never pays for that question.
 *
 * Batches: what many jobs need from fanout.jobs at about the same time goes in one statement
 * over arrays (AT_JOB), each row with the same token check its single-job form has: the done
 * records, the marks' records and the lease renewals. One batch of a kind is out at a time;
 * what arrives meanwhile goes in the next one, so a lone job waits for nothing and a flood
 * costs one statement per batch. Done records, which nothing waits for (the job's slot is
 * free already, and its notifications are in Redis), go out with a quarter of a batch, with
 * the next claim or on the next tick, whichever comes first: sent as soon as the last batch
 * answered, a flood's batches held four or five records each, and a statement's fixed cost
 * in PostgreSQL (executor set-up, commit) was most of theirs. A batched done record the
 * server refuses is sent again alone, so that a bad record fails alone.
 *
 * Records: a finished job leaves a small record of its outcome (done, released on a graceful
 * stop, or a failed attempt) that is written with a token check and retried on the tick
 * timer, with a backoff, until PostgreSQL takes it. Losing one is safe: the lease expires,
 * the next claim fences, and Redis's progress mark says where the job stands. A record the
 * server keeps refusing (not a lost connection: an error of the statement or its data) is
 * logged at most once per REC_LOG_MS with the reason, and after ten leases of refusals it
 * is replaced by one that declares the job dead with that reason in last_error, so that no
 * job holds its lease and its slot in the held list forever.
 *
 * The store is an object of its own: the daemon calls it, and it answers through the
 * callbacks of fod_store_events_t (a job claimed, a claim or record settled, a lease lost).
 */
#include "fanout/fod_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { REC_FINISH, REC_RELEASE, REC_FAIL, REC_DEAD } rec_kind_t;
typedef struct store_rec store_rec_t;
typedef struct mark_call mark_call_t;

#define REC_RETRY_MS 500      /* first retry of a record not written; doubles, */
#define REC_RETRY_MAX_MS 5000 /* up to this */
#define REC_LOG_MS 30000      /* at most one "not written" line per record in this time */
#define REC_GIVE_UP_LEASES 10 /* refused this many lease_ms in a row: the job is dead */
#define PLANS_MS 10000        /* the control connection's generic plans are made again, */
#define PLANS_BUSY_MS 1000    /* or this soon after PLANS_BUSY_JOBS claimed jobs (the table grew) */
#define PLANS_BUSY_JOBS 1000

struct mark_call {
    mark_call_t *next;
    int64_t job_id, token;
    void (*cb)(int status, void *data);
    void *data;
};

struct store_rec {
    store_rec_t *next;
    fod_store_t *s;
    rec_kind_t kind;
    int64_t job_id, event_id, token, cursor, delivered;
    uint64_t started_ms, retry_at;
    uint64_t refused_since, logged_at; /* refusals by the server (0: none yet) */
    unsigned tries;
    int sending;
    int solo;    /* REC_FINISH refused in a batch: sent alone from now on */
    int fatal;   /* REC_FAIL: dead at once */
    int parted;  /* other jobs of its event may exist (fod_job_parted) */
    char *error; /* REC_FAIL, REC_DEAD */
};

struct fod_store {
    pgc_conn_t *ctl;
    rel_reader_t *reader;
    const cfg_t *cfg;
    met_t *metrics;
    fod_store_events_t ev;
    store_rec_t *recs;                /* outcomes not yet written to fanout.jobs */
    int finishing;                    /* a batch of done records is out */
    mark_call_t *marks, **marks_tail; /* marks' records waiting for the next batch */
    int marking;                      /* a batch of marks' records is out */
    /* the per-job lines' rate limits (fo_log_rated) */
    fo_log_rate_t claimed_rate, split_rate, done_rate, released_rate;
    int claiming, claim_again;
    int splits;              /* splits out (their jobs run here meanwhile) */
    unsigned claim_refusals; /* claims refused in a row for a reason someone must fix */
    unsigned mine_searched;  /* pgc_conn_connects when a claim last looked for own jobs */
    uint64_t claim_retry_at; /* no claim before this (after such a refusal) */
    uint64_t plans_at;       /* when the generic plans were last discarded (PLANS_MS) */
    uint64_t plans_claimed;  /* jobs claimed since then */
};

/*
 * One claimable job: pending, or running under an expired lease, or under this worker's own
 * id but not running here (this worker restarted: identity.c holds the id's lock, so the
 * previous holder of the id is gone; or a claim's or split's answer was lost with the
 * connection). Never a second job of an event this worker already runs, so the ranges of one
 * big fan-out spread over workers and leave this worker's other slots to other events.
 *
 * Each kind has its own read, so that a claim reads only rows it may take: pending jobs in
 * claim order (the jobs_pending index), running ones whose lease has expired (jobs_lease_ends,
 * by lease end; usually none), and this worker's own running jobs that it does not hold only
 * when $8 asks: on the first claim of each connection, since such a job exists only after a
 * restart or a lost answer. Reading them on every claim walked past every job running here
 * (up to max_jobs rows, each compared with the arrays of held jobs) and cost most of the
 * claim. The three reads are merged in claim order and cut at the limit; a row locked but cut
 * is free again when the statement ends.
 *
 * What a claim costs: taking a pending job starts an attempt (max_attempts of them may fail
 * with an error); taking a running one means its holder vanished (crashed, killed, stalled
 * past its lease), which says little about the event and counts in lease_losses instead,
 * with its own, higher limit, reset by progress (SQL_RENEW): a healthy job survives any
 * number of crashes that let it move on, while one that kills every worker holding it, at
 * the same place, is declared dead after max_lease_losses.
 * $1 worker, $2 lease ms, $3 job ids held here (a lease of one may have run out while it
 * runs: never claimed again here meanwhile), $4 the events of those that share their event
 * with other jobs (split ones), $5 max attempts,
 * $6 max lease losses, $7 how many jobs at most (ordered as one at a time would be), $8
 * whether to look for this worker's own jobs that it does not hold.
 */
#define CLAIM_COLS "id, event_id, next_attempt_at, attempts, lease_losses"
static const char SQL_CLAIM[] =
    "WITH pend AS ("
    " SELECT " CLAIM_COLS ", false AS lost FROM fanout.jobs"
    " WHERE state = 'pending' AND next_attempt_at <= now()"
    "   AND NOT (event_id = ANY ($4::bigint[]))"
    " ORDER BY next_attempt_at, id FOR UPDATE SKIP LOCKED LIMIT $7::int),"
    " expired AS ("
    " SELECT " CLAIM_COLS ", true AS lost FROM fanout.jobs"
    " WHERE state = 'running' AND lease_until < now() AND next_attempt_at <= now()"
    "   AND NOT (id = ANY ($3::bigint[])) AND NOT (event_id = ANY ($4::bigint[]))"
    " ORDER BY next_attempt_at, id FOR UPDATE SKIP LOCKED LIMIT $7::int),"
    " mine AS ("
    " SELECT " CLAIM_COLS ", true AS lost FROM fanout.jobs"
    " WHERE $8::boolean AND state = 'running' AND lease_until >= now() AND lease_owner = $1"
    "   AND next_attempt_at <= now() AND NOT (id = ANY ($3::bigint[]))"
    "   AND NOT (event_id = ANY ($4::bigint[]))"
    " ORDER BY next_attempt_at, id FOR UPDATE SKIP LOCKED LIMIT $7::int),"
    " c0 AS (SELECT * FROM pend UNION ALL SELECT * FROM expired UNION ALL SELECT * FROM mine"
    "        ORDER BY next_attempt_at, id LIMIT $7::int),"
    /* one job per event, the first in claim order; the others stay pending (their row
     * locks end with the statement), so an event's ranges spread over workers */
    " c AS (SELECT DISTINCT ON (event_id) id, lost, CASE WHEN lost THEN lease_losses + 1 > $6"
    "                                                 ELSE attempts >= $5 END AS dead"
    "       FROM c0 ORDER BY event_id, next_attempt_at, id)"
    " UPDATE fanout.jobs j SET"
    "   state = CASE WHEN c.dead THEN 'dead' ELSE 'running' END,"
    "   lease_owner = CASE WHEN c.dead THEN NULL ELSE $1 END,"
    "   lease_until = CASE WHEN c.dead THEN NULL"
    "                 ELSE now() + $2::bigint * interval '1 millisecond' END,"
    "   last_error = CASE WHEN c.dead AND c.lost THEN 'its holder vanished ' ||"
    "     j.lease_losses + 1 || ' times without progress (a worker crashed, was killed or"
    " stalled past its lease while holding it; max_lease_losses ' || $6 || ')'"
    "     || coalesce('; earlier: ' || j.last_error, '')"
    "     WHEN c.dead THEN 'attempts used up (' || j.attempts || ', max_attempts ' || $5 || ')'"
    "     || coalesce('; earlier: ' || j.last_error, '') ELSE j.last_error END,"
    "   finished_at = CASE WHEN c.dead THEN now() END,"
    "   token = j.token + 1,"
    "   attempts = CASE WHEN c.dead OR c.lost THEN j.attempts ELSE j.attempts + 1 END,"
    "   lease_losses = CASE WHEN c.lost THEN j.lease_losses + 1 ELSE j.lease_losses END,"
    "   started_at = coalesce(j.started_at, now())"
    /* the ids again as an array: the jobs are then found by their primary key. A join on
     * c alone let the generic plan (plan_cache_mode) hash the whole jobs table on every claim
     * while it held some ten thousand rows (it guesses c holds a tenth of the pending jobs) */
    " FROM c, fanout.events e WHERE j.id = c.id AND j.id = ANY (ARRAY(SELECT id FROM c))"
    "   AND e.id = j.event_id"
    " RETURNING j.id, j.event_id, e.author, e.kind, e.payload::text,"
    /* the server stamps created_at (sql/008); a row from before that may hold 'infinity' */
    "   to_char(CASE WHEN isfinite(e.created_at) THEN e.created_at ELSE j.created_at END"
    "           AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
    "   j.token, j.range_lo, coalesce(j.range_hi, 9223372036854775807), j.state,"
    "   (j.range_hi IS NULL AND j.range_lo = 0 AND j.progress = 0 AND j.delivered = 0)::int,"
    "   j.last_error, j.progress, j.delivered, j.mark_created::int,"
    "   (SELECT count(*) FROM c0)::int";

/*
 * A job of the whole range with nothing written yet (no progress recorded, and its fence
 * finds its mark at the start: an earlier holder may have been stopped or killed before it
 * wrote anything, so not only token 1) whose first page came back full may be split into
 * follower-id ranges. Its first page gives the author's lowest follower; the highest is read
 * through the contract view on a read-only reader connection (rel_reader_query_view: every read
 * of the view is read-only);
 * then, when they span at least split_min_span ids, one statement on the control connection cuts
 * (lo, hi] into split_parts ranges of equal span: this job keeps the first, the others become
 * pending jobs, and a NOTIFY wakes the other workers. One statement, so a crash splits all or
 * nothing.
 */
static const char SQL_BOUNDS[] =
    "SELECT (SELECT follower FROM %1$s.%2$s WHERE author = $1 ORDER BY follower DESC LIMIT 1)";

/* $1 job, $2 token, $3 parts, $4 lowest follower, $5 highest. Returns the job's new
 * range_hi (NULL when it was not split: the lease moved on) and the jobs added. */
static const char SQL_SPLIT[] =
    "WITH cuts AS (SELECT i, $4::bigint + (($5::bigint - $4::bigint)::numeric * i"
    "                                       / $3::int)::bigint AS b"
    "              FROM generate_series(1, $3::int - 1) AS i),"
    " me AS (UPDATE fanout.jobs SET range_hi = (SELECT b FROM cuts WHERE i = 1)"
    "        WHERE id = $1 AND token = $2 AND range_hi IS NULL"
    "        RETURNING event_id, range_hi),"
    " ins AS (INSERT INTO fanout.jobs (event_id, range_lo, range_hi)"
    "         SELECT me.event_id, c.b, (SELECT c2.b FROM cuts c2 WHERE c2.i = c.i + 1)"
    "         FROM me, cuts c RETURNING id)"
    " SELECT (SELECT range_hi FROM me), (SELECT count(*) FROM ins),"
    "        (SELECT count(pg_notify('fanout_events', event_id::text)) FROM me)";

/* The batched statements below find their jobs by primary key from $1 (job ids, each once)
 * and read a job's values at its position there: "($2::bigint[])" AT_JOB is its element of
 * $2. No join: joined on an unnest, a generic plan hashed a sequential scan of fanout.jobs
 * (planned when it was small), or rescanned the unnest for every job (n x n rows). */
#define AT_JOB "[array_position($1::bigint[], j.id)]"

/* Every lease this worker holds, in one statement. Progress since the last checkpoint
 * clears the count of vanished holders (SQL_CLAIM). $1 job ids, $2 their tokens, $3 lease
 * ms, $4 cursors, $5 delivered counts, $6 why each waits (NULL: it does not), for fanoutctl
 * status. Returns the ids renewed: a job missing from them lost its lease. */
static const char SQL_RENEW[] =
    "UPDATE fanout.jobs j SET lease_until = now() + $3::bigint * interval '1 millisecond',"
    " lease_losses = CASE WHEN ($4::bigint[])" AT_JOB " > j.progress THEN 0"
    "                ELSE j.lease_losses END,"
    " progress = greatest(j.progress, ($4::bigint[])" AT_JOB "),"
    " delivered = greatest(j.delivered, ($5::bigint[])" AT_JOB "),"
    " waiting_reason = ($6::text[])" AT_JOB
    " WHERE j.id = ANY ($1::bigint[]) AND j.token = ($2::bigint[])" AT_JOB
    "   AND j.state = 'running' RETURNING j.id";

/* The jobs' progress marks exist in Redis: before their first page (see fod_job_io_t).
 * $1 job ids, $2 their tokens; returns the ids recorded. */
static const char SQL_MARKED[] =
    "UPDATE fanout.jobs j SET mark_created = true"
    " WHERE j.id = ANY ($1::bigint[]) AND j.token = ($2::bigint[])" AT_JOB
    "   AND j.state = 'running' RETURNING j.id";

/* The jobs of a finished job's event: 1 for a job of the whole range (an event that was
 * never split has one job, and a split gives the first job its range_hi), else counted. */
#define EVENT_JOBS(j)                                                                              \
    "CASE WHEN " j ".range_lo = 0 AND " j ".range_hi IS NULL THEN 1"                               \
    " ELSE (SELECT count(*) FROM fanout.jobs o WHERE o.event_id = " j ".event_id) END"

/* Done records of many jobs: $1 ids, $2 tokens, $3 cursors, $4 delivered counts. Returns, per
 * job written, its id, the seconds from publish to done and the jobs of its event. */
static const char SQL_FINISH_MANY[] =
    "UPDATE fanout.jobs j SET state = 'done', progress = ($3::bigint[])" AT_JOB ","
    " delivered = ($4::bigint[])" AT_JOB ","
    " finished_at = now(), lease_owner = NULL, lease_until = NULL, last_error = NULL,"
    " waiting_reason = NULL"
    " WHERE j.id = ANY ($1::bigint[]) AND j.token = ($2::bigint[])" AT_JOB
    "   AND j.state = 'running'"
    " RETURNING j.id, extract(epoch FROM j.finished_at -"
    "   (SELECT e.created_at FROM fanout.events e WHERE e.id = j.event_id"
    "    AND isfinite(e.created_at)))::float8,"
    " " EVENT_JOBS("j");

static const char SQL_FINISH[] =
    "UPDATE fanout.jobs SET state = 'done', progress = $3, delivered = $4,"
    " finished_at = now(), lease_owner = NULL, lease_until = NULL, last_error = NULL,"
    " waiting_reason = NULL"
    " WHERE id = $1 AND token = $2 AND state = 'running'"
    " RETURNING extract(epoch FROM finished_at -"
    "   (SELECT e.created_at FROM fanout.events e WHERE e.id = event_id"
    "    AND isfinite(e.created_at)))::float8,"
    " " EVENT_JOBS("jobs");

/* A graceful stop is no failed attempt: the attempt is given back. */
static const char SQL_RELEASE[] =
    "UPDATE fanout.jobs SET state = 'pending', progress = greatest(progress, $3),"
    " delivered = greatest(delivered, $4),"
    " lease_owner = NULL, lease_until = NULL, attempts = greatest(attempts - 1, 0),"
    " waiting_reason = NULL"
    " WHERE id = $1 AND token = $2 AND state = 'running'";

/* A record refused too long (REC_GIVE_UP_LEASES): the job is dead with the reason.
 * $5 the error. */
static const char SQL_DEAD[] =
    "UPDATE fanout.jobs SET state = 'dead', progress = greatest(progress, $3),"
    " delivered = greatest(delivered, $4), last_error = $5, lease_owner = NULL,"
    " lease_until = NULL, finished_at = now()"
    " WHERE id = $1 AND token = $2 AND state = 'running' RETURNING state";

/* A failed attempt: dead when the attempts are used up, else pending again after
 * $7 * 2^(attempts - 1) ms, at most $8 ms. $5 the error, $6 max attempts (0 for a fatal
 * failure: dead at once, until fanoutctl retry). */
static const char SQL_FAIL[] =
    "UPDATE fanout.jobs SET state = CASE WHEN attempts >= $6 THEN 'dead' ELSE 'pending' END,"
    " progress = greatest(progress, $3), delivered = greatest(delivered, $4), last_error = $5,"
    " lease_owner = NULL, lease_until = NULL, waiting_reason = NULL,"
    " next_attempt_at = now() + least($8::numeric,"
    "   $7::numeric * power(2::numeric, least(attempts - 1, 40)))::float8"
    "   * interval '1 millisecond',"
    " finished_at = CASE WHEN attempts >= $6 THEN now() END"
    " WHERE id = $1 AND token = $2 AND state = 'running' RETURNING state";

/* Served by the jobs_pending and jobs_lease_ends partial indexes (a BitmapOr, sql/009 and
 * 010): only pending and running jobs are read. A running job always has a lease end (the
 * claim sets it), and saying so lets the planner use jobs_lease_ends. */
static const char SQL_OLDEST[] =
    "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
    " FROM fanout.jobs WHERE state = 'pending' OR (state = 'running' AND lease_until IS NOT NULL)";

fod_store_t *fod_store_new(pgc_conn_t *ctl, rel_reader_t *reader, const cfg_t *cfg, met_t *metrics,
                           const fod_store_events_t *events)
{
    fod_store_t *s = fo_xcalloc(1, sizeof *s);
    *s = (fod_store_t){.ctl = ctl, .reader = reader, .cfg = cfg, .metrics = metrics, .ev = *events};
    s->marks_tail = &s->marks;
    /* Generic plans: the statements below run thousands of times a second in a flood of small
     * events, and PostgreSQL's default would plan the array ones anew on every call (their
     * custom plans look cheaper), which cost as much CPU as running them. Their generic plans
     * are the same index lookups, once fanout.jobs holds a few thousand rows; a plan made while
     * it was smaller (a sequential scan) would stay until the table's next ANALYZE, so
     * fod_store_retry discards them every PLANS_MS, and every PLANS_BUSY_MS while jobs are
     * claimed by the thousand (a flood fills the table in seconds: each done record scanned
     * all of it until the next discard), and they are made again from the table's size then.
     * The array statements find their jobs by "j.id = ANY ($1)", with no join (AT_JOB). */
    pgc_conn_setup(ctl, "SET plan_cache_mode = force_generic_plan");
    pgc_conn_prepare(ctl, "fo_claim", SQL_CLAIM, 8);
    pgc_conn_prepare(ctl, "fo_renew", SQL_RENEW, 6);
    pgc_conn_prepare(ctl, "fo_marked", SQL_MARKED, 2);
    pgc_conn_prepare(ctl, "fo_finish", SQL_FINISH, 4);
    pgc_conn_prepare(ctl, "fo_finish_many", SQL_FINISH_MANY, 4);
    pgc_conn_prepare(ctl, "fo_release", SQL_RELEASE, 4);
    pgc_conn_prepare(ctl, "fo_fail", SQL_FAIL, 8);
    pgc_conn_prepare(ctl, "fo_dead", SQL_DEAD, 5);
    pgc_conn_prepare(ctl, "fo_oldest", SQL_OLDEST, 0);
    pgc_conn_prepare(ctl, "fo_split", SQL_SPLIT, 5);
    return s;
}

int fod_store_busy(const fod_store_t *s)
{
    return s->claiming || s->recs != NULL || s->splits > 0;
}

static void log_pg_error(const char *msg, const PGresult *res)
{
    char what[512];
    fo_log_quote(what, sizeof what, res ? PQresultErrorMessage(res) : "connection lost");
    fo_log(FO_LOG_WARN, msg, "error=%s", what);
}

#define I64(buf, v) snprintf(buf, sizeof buf, "%" PRId64, (int64_t)(v))

/* The rows an UPDATE changed (PQcmdTuples, parsed strictly; 0 when it says nothing). */
static long long rows_changed(const PGresult *res)
{
    long long n;
    return fo_parse_int(PQcmdTuples((PGresult *)res), 0, INT64_MAX, &n) == 0 ? n : 0;
}

/* --- records --- */

static void rec_send(store_rec_t *r);

static void rec_free(store_rec_t *r)
{
    for (store_rec_t **p = &r->s->recs; *p; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            break;
        }
    }
    free(r->error);
    free(r);
}

/* A record was not written: retry later; one the server keeps refusing becomes REC_DEAD. */
static void rec_refused(store_rec_t *r, const PGresult *res)
{
    static const char *const names[] = {"done", "released", "failed attempt", "dead"};
    uint64_t now = fo_now_ms();
    r->retry_at = now + fo_doubling_ms(r->tries, REC_RETRY_MS, REC_RETRY_MAX_MS);
    r->tries++;
    if (!res || pgc_err_classify_result(res) == PGC_ERR_TRANSIENT) {
        r->refused_since = 0; /* the connection, not the record: wait for it */
        return;
    }
    if (!r->refused_since)
        r->refused_since = now;
    const char *why = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    char what[512];
    fo_log_quote(what, sizeof what, why ? why : PQresultErrorMessage(res));
    if (!r->logged_at || now >= r->logged_at + REC_LOG_MS) {
        r->logged_at = now;
        fo_log(FO_LOG_WARN, "job record not written; retrying",
               "job=%" PRId64 " event=%" PRId64 " record=%s tries=%u error=%s", r->job_id,
               r->event_id, names[r->kind], r->tries, what);
    }
    uint64_t bound = (uint64_t)REC_GIVE_UP_LEASES * (uint64_t)r->s->cfg->lease_ms;
    if (r->kind == REC_DEAD || now - r->refused_since < bound)
        return;
    char *error = fo_xasprintf(
        "fanoutd could not record the job %s for %" PRIu64 " s: the server refused it: %s",
        names[r->kind], (now - r->refused_since) / 1000, why ? why : "unknown error");
    fo_log(FO_LOG_ERROR, "job record refused too long; declaring the job dead",
           "job=%" PRId64 " event=%" PRId64 " record=%s error=%s", r->job_id, r->event_id,
           names[r->kind], what);
    free(r->error);
    r->error = error;
    r->kind = REC_DEAD;
    r->refused_since = 0;
    r->retry_at = now;
}

/* A record's statement answered: res row `row` is its returned row (-1: none), written
 * whether it changed the job. Logs, counts, frees the record and reports it settled. */
static void rec_settle(store_rec_t *r, const PGresult *res, int row, int written)
{
    fod_store_t *s = r->s;
    met_t *m = s->metrics;
    static const char *const what[] = {"job done", "job released", "job attempt failed",
                                       "job is dead: its outcome could not be recorded"};
    char err[512] = "";
    if (r->error)
        fo_log_quote(err, sizeof err, r->error);
    /* the columns after the id (batched done records) or from the first (single) */
    int c0 = r->kind == REC_FINISH && PQnfields(res) == 3 ? 1 : 0;
    if (written && r->kind == REC_FINISH) {
        m->jobs_done++;
        if (row >= 0 && !PQgetisnull(res, row, c0))
            met_hist_observe(&m->publish_to_done, atof(PQgetvalue(res, row, c0)));
        /* the parts of a split event are all created before any of them runs */
        long long parts = 1;
        if (row >= 0 && PQnfields(res) > c0 + 1 &&
            fo_parse_int(PQgetvalue(res, row, c0 + 1), 1, INT32_MAX, &parts) != 0)
            parts = 1;
        m->events_done += 1.0 / (double)parts;
    } else if (written && r->kind == REC_DEAD) {
        m->jobs_dead++;
    } else if (written && r->kind == REC_FAIL) {
        m->jobs_failed++;
        if (strcmp(PQgetvalue(res, row, 0), "dead") == 0)
            m->jobs_dead++;
    }
    if (!written)
        fo_log(FO_LOG_WARN, "job record not written: the lease moved on",
               "job=%" PRId64 " event=%" PRId64 " token=%" PRId64, r->job_id, r->event_id,
               r->token);
    else {
        /* done and released are routine (one per job): rate-limited; failures never */
        fo_log(r->kind == REC_DEAD   ? FO_LOG_ERROR
               : r->kind == REC_FAIL ? FO_LOG_WARN
               : r->kind == REC_RELEASE
                   ? fo_log_rated(&s->released_rate, what[r->kind], FO_LOG_INFO)
                   : fo_log_rated(&s->done_rate, what[r->kind], FO_LOG_INFO),
               what[r->kind],
               "job=%" PRId64 " event=%" PRId64 " delivered=%" PRId64 " seconds=%.3f%s%s",
               r->job_id, r->event_id, r->delivered, (double)(fo_now_ms() - r->started_ms) / 1000.0,
               err[0] ? " error=" : "", err);
    }
    rec_free(r);
    s->ev.settled(s->ev.ctx, 1);
}

static void on_rec(int status, const PGresult *res, void *data)
{
    store_rec_t *r = data;
    r->sending = 0;
    if (status == FO_ESTOP)
        return; /* closing: records are freed with the store */
    if (status < 0) {
        r->s->metrics->errors[MET_PG]++;
        rec_refused(r, res);
        return;
    }
    rec_settle(r, res, PQntuples(res) > 0 ? 0 : -1, rows_changed(res) > 0);
}

/* --- text arrays for the batched statements (elements quoted; integers: fo_buf_arr_i64) --- */

static void arr_text(fo_buf_t *b, const char *v)
{
    fo_buf_puts(b, b->len ? "," : "{");
    if (!v) {
        fo_buf_puts(b, "NULL");
        return;
    }
    fo_buf_puts(b, "\"");
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\')
            fo_buf_puts(b, "\\");
        fo_buf_put(b, p, 1);
    }
    fo_buf_puts(b, "\"");
}

/* The row of res whose first column is id, or -1 (the batches return their ids). */
static int row_of(const PGresult *res, int64_t id)
{
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t v;
        if (fo_parse_int64(PQgetvalue(res, i, 0), &v) == 0 && v == id)
            return i;
    }
    return -1;
}

/* --- done records, batched --- */

typedef struct finish_batch {
    fod_store_t *s;
    size_t n;
    store_rec_t *recs[];
} finish_batch_t;

static void finish_flush(fod_store_t *s, int all);

static void on_finish_batch(int status, const PGresult *res, void *data)
{
    finish_batch_t *b = data;
    fod_store_t *s = b->s;
    s->finishing = 0;
    if (status == FO_ESTOP) { /* closing: records are freed with the store */
        free(b);
        return;
    }
    if (status < 0)
        s->metrics->errors[MET_PG]++;
    int transient = !res || pgc_err_classify_result(res) == PGC_ERR_TRANSIENT;
    for (size_t i = 0; i < b->n; i++) {
        store_rec_t *r = b->recs[i];
        r->sending = 0;
        if (status < 0 && b->n > 1 && !transient) {
            r->solo = 1; /* which one the server refuses: each goes alone now */
            r->retry_at = 0;
        } else if (status < 0) {
            rec_refused(r, res);
        } else {
            int row = row_of(res, r->job_id);
            rec_settle(r, res, row, row >= 0);
        }
    }
    int split = status < 0 && b->n > 1 && !transient;
    free(b);
    if (split) {
        for (store_rec_t *r = s->recs; r; r = r->next)
            if (r->solo && !r->sending)
                rec_send(r);
    }
    finish_flush(s, 0);
}

/* Sends the done records that are due in one statement, unless a batch is out (its answer
 * sends the next): all of them (up to a batch), or only once a quarter of a batch is due. */
static void finish_flush(fod_store_t *s, int all)
{
    if (s->finishing || !pgc_conn_ready(s->ctl))
        return;
    uint64_t now = fo_now_ms();
    size_t n = 0, cap = (size_t)s->cfg->claim_batch;
    for (store_rec_t *r = s->recs; r; r = r->next)
        n += r->kind == REC_FINISH && !r->solo && !r->sending && now >= r->retry_at;
    if (n == 0 || (!all && n < (cap + 3) / 4))
        return;
    n = n < cap ? n : cap;
    finish_batch_t *b = fo_xmalloc(sizeof *b + n * sizeof b->recs[0]);
    b->s = s;
    b->n = 0;
    fo_buf_t ids = {0}, tokens = {0}, cursors = {0}, delivered = {0};
    for (store_rec_t *r = s->recs; r && b->n < n; r = r->next) {
        if (r->kind != REC_FINISH || r->solo || r->sending || now < r->retry_at)
            continue;
        b->recs[b->n++] = r;
        fo_buf_arr_i64(&ids, r->job_id);
        fo_buf_arr_i64(&tokens, r->token);
        fo_buf_arr_i64(&cursors, r->cursor);
        fo_buf_arr_i64(&delivered, r->delivered);
    }
    const char *params[] = {fo_buf_arr_end(&ids), fo_buf_arr_end(&tokens), fo_buf_arr_end(&cursors),
                            fo_buf_arr_end(&delivered)};
    if (pgc_conn_exec(s->ctl, "fo_finish_many", 4, params, 0, on_finish_batch, b) == 0) {
        s->finishing = 1;
        for (size_t i = 0; i < b->n; i++)
            b->recs[i]->sending = 1;
    } else {
        free(b);
    }
    fo_buf_free(&ids);
    fo_buf_free(&tokens);
    fo_buf_free(&cursors);
    fo_buf_free(&delivered);
}

static void rec_send(store_rec_t *r)
{
    const cfg_t *cfg = r->s->cfg;
    char id[24], token[24], cursor[24], delivered[24], max[16], base[16], cap[16];
    I64(id, r->job_id);
    I64(token, r->token);
    I64(cursor, r->cursor);
    I64(delivered, r->delivered);
    I64(max, r->fatal ? 0 : cfg->max_attempts);
    I64(base, cfg->retry_base_ms);
    I64(cap, cfg->retry_max_ms);
    const char *params[] = {id, token, cursor, delivered, r->error, max, base, cap};
    static const char *const stmts[] = {"fo_finish", "fo_release", "fo_fail", "fo_dead"};
    int nparams = r->kind == REC_FAIL ? 8 : r->kind == REC_DEAD ? 5 : 4;
    if (pgc_conn_exec(r->s->ctl, stmts[r->kind], nparams, params, 0, on_rec, r) == 0)
        r->sending = 1;
    else
        r->retry_at = fo_now_ms() + REC_RETRY_MS;
}

void fod_store_record(fod_store_t *s, const fod_outcome_t *o)
{
    static const rec_kind_t kinds[] = {REC_FINISH, REC_RELEASE, REC_FAIL};
    store_rec_t *r = fo_xcalloc(1, sizeof *r);
    r->s = s;
    r->kind = kinds[o->kind];
    r->job_id = o->job_id;
    r->event_id = o->event_id;
    r->token = o->token;
    r->cursor = o->cursor;
    r->delivered = o->delivered;
    r->started_ms = o->started_ms;
    if (o->error)
        r->error = fo_xstrdup(o->error);
    r->fatal = o->fatal;
    r->parted = o->parted;
    r->next = s->recs;
    s->recs = r;
    if (r->kind == REC_FINISH)
        finish_flush(s, 0);
    else
        rec_send(r);
}

static void on_discarded(int status, const PGresult *res, void *data)
{
    (void)status, (void)res, (void)data; /* the old plans serve until the next try */
}

void fod_store_retry(fod_store_t *s, uint64_t now)
{
    uint64_t age = now - s->plans_at;
    if ((age >= PLANS_MS || (age >= PLANS_BUSY_MS && s->plans_claimed >= PLANS_BUSY_JOBS)) &&
        pgc_conn_ready(s->ctl) &&
        pgc_conn_query(s->ctl, "DISCARD PLANS", 0, NULL, on_discarded, NULL) == 0) {
        s->plans_at = now;
        s->plans_claimed = 0;
    }
    for (store_rec_t *r = s->recs; r; r = r->next)
        if (!r->sending && now >= r->retry_at && (r->kind != REC_FINISH || r->solo))
            rec_send(r);
    finish_flush(s, 1);
}

void fod_store_free(fod_store_t *s)
{
    if (!s)
        return;
    while (s->recs) {
        store_rec_t *r = s->recs;
        s->recs = r->next;
        free(r->error);
        free(r);
    }
    while (s->marks) { /* none: the closing batch answered them */
        mark_call_t *mc = s->marks;
        s->marks = mc->next;
        free(mc);
    }
    free(s);
}

/* --- claims and splits --- */

/* A bigint column of a row, parsed strictly; 0 or -1. */
static int row_int64(const PGresult *res, int row, int col, int64_t *out)
{
    return fo_parse_int64(PQgetvalue(res, row, col), out);
}

/* A split on its way: the bounds query, then the split statement. */
typedef struct split_call {
    fod_store_t *s;
    int64_t job_id, token, lo;
    fod_split_cb cb;
    void *data;
} split_call_t;

/* The split is over: status 0 with the job's range end (INT64_MAX: not split, the job runs
 * whole, exact either way since nothing of it was written), FO_EPG when its outcome is
 * unknown, FO_ESTOP when closing. */
static void split_done(split_call_t *sc, int status, int64_t range_hi)
{
    sc->s->splits--;
    sc->cb(status, range_hi, sc->data);
    free(sc);
}

static void on_split(int status, const PGresult *res, void *data)
{
    split_call_t *sc = data;
    fod_store_t *s = sc->s;
    if (status == FO_ESTOP) {
        split_done(sc, FO_ESTOP, 0);
        return;
    }
    int64_t hi;
    int got_range = status == 0 && !PQgetisnull(res, 0, 0);
    if (got_range && row_int64(res, 0, 0, &hi) == 0) {
        long long added = 0;
        if (fo_parse_int(PQgetvalue(res, 0, 1), 0, INT32_MAX, &added) < 0)
            added = 0;
        fo_log(fo_log_rated(&s->split_rate, "job split", FO_LOG_INFO),
               "job split into follower-id ranges", "job=%" PRId64 " parts=%lld range_hi=%" PRId64,
               sc->job_id, 1 + added, hi);
        split_done(sc, 0, hi);
        return;
    }
    if (got_range || !res) {
        /* The connection died (or the range end is not a number) with the split's outcome
         * unknown: it may have committed, and running the job whole would then repeat the other
         * ranges. Leave the job to its lease: once the connection is back, this worker re-claims
         * its own lease and gets the job with whatever range is committed. */
        fo_log(FO_LOG_WARN, "split outcome unknown (connection lost); the job is re-claimed",
               "job=%" PRId64, sc->job_id);
        split_done(sc, FO_EPG, 0);
        return;
    }
    if (status != 0)
        log_pg_error("split failed; the job runs whole", res);
    split_done(sc, 0, INT64_MAX); /* not split: the lease moved on, or it failed */
}

static void on_bounds(int status, const PGresult *res, void *data)
{
    split_call_t *sc = data;
    fod_store_t *s = sc->s;
    if (status == FO_ESTOP) {
        split_done(sc, FO_ESTOP, 0);
        return;
    }
    if (status != 0 || PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        if (status != 0)
            log_pg_error("follower bounds not read; the job runs whole", res);
        split_done(sc, 0, INT64_MAX);
        return;
    }
    int64_t hi;
    if (row_int64(res, 0, 0, &hi) < 0 || hi - sc->lo < s->cfg->split_min_span) {
        split_done(sc, 0, INT64_MAX); /* not worth it */
        return;
    }
    char id[24], token[24], parts[16], los[24], his[24];
    I64(id, sc->job_id);
    I64(token, sc->token);
    I64(parts, s->cfg->split_parts);
    I64(los, sc->lo);
    I64(his, hi);
    const char *params[] = {id, token, parts, los, his};
    if (pgc_conn_exec(s->ctl, "fo_split", 5, params, 0, on_split, sc) < 0)
        split_done(sc, 0, INT64_MAX); /* not sent: nothing changed */
}

int fod_store_split(fod_store_t *s, int64_t job_id, int64_t token, int64_t author, int64_t lo,
                    fod_split_cb cb, void *data)
{
    if (s->cfg->split_min_span <= 0 || !s->reader)
        return FO_EINVAL;
    split_call_t *sc = fo_xmalloc(sizeof *sc);
    *sc = (split_call_t){s, job_id, token, lo, cb, data};
    char a[24];
    I64(a, author);
    const char *params[] = {a};
    if (rel_reader_query_view(s->reader, SQL_BOUNDS, 1, params, on_bounds, sc) < 0) {
        free(sc);
        return FO_EPG;
    }
    s->splits++;
    return 0;
}

#define CLAIM_BACKOFF_MAX_MS 60000

/* One claimed row: a job to start, or one the claim declared dead. */
static void claim_row(fod_store_t *s, const PGresult *res, int i)
{
    fod_claim_t c = {0};
    if (row_int64(res, i, 0, &c.job_id) || row_int64(res, i, 1, &c.event_id) ||
        row_int64(res, i, 2, &c.author) || row_int64(res, i, 6, &c.token) ||
        row_int64(res, i, 7, &c.range_lo) || row_int64(res, i, 8, &c.range_hi) ||
        row_int64(res, i, 12, &c.pg_progress) || row_int64(res, i, 13, &c.pg_delivered)) {
        fo_log(FO_LOG_ERROR, "claim returned a malformed row", NULL);
        return;
    }
    c.pg_marked = strcmp(PQgetvalue(res, i, 14), "1") == 0;
    c.kind = PQgetvalue(res, i, 3);
    c.payload = PQgetvalue(res, i, 4);
    c.created_at = PQgetvalue(res, i, 5);
    if (strcmp(PQgetvalue(res, i, 9), "dead") == 0) {
        char what[512];
        fo_log_quote(what, sizeof what, PQgetvalue(res, i, 11));
        s->metrics->jobs_dead++;
        fo_log(FO_LOG_ERROR, "job is dead; fanoutctl retry EVENT requeues it",
               "job=%" PRId64 " event=%" PRId64 " error=%s", c.job_id, c.event_id, what);
        return;
    }
    fo_log(fo_log_rated(&s->claimed_rate, "job claimed", FO_LOG_INFO), "job claimed",
           "job=%" PRId64 " event=%" PRId64 " author=%" PRId64 " token=%" PRId64
           " range_lo=%" PRId64,
           c.job_id, c.event_id, c.author, c.token, c.range_lo);
    c.split_candidate = strcmp(PQgetvalue(res, i, 10), "1") == 0 && s->cfg->split_min_span > 0;
    s->ev.claimed(s->ev.ctx, &c);
}

/* Returns 1 when there may be more to claim at once, 0 otherwise. */
static int claim_result(fod_store_t *s, int status, const PGresult *res, int asked)
{
    if (status < 0) {
        s->metrics->errors[MET_PG]++;
        const char *fix = res ? pgc_err_fix(res, 0) : NULL;
        if (!fix) {
            if (res)
                log_pg_error("claim failed", res);
            return 0; /* the poll timer tries again */
        }
        /* a missing grant or schema: someone must act; say how, rarely, and ask the server
         * rarely too (its log holds every refusal) */
        s->claim_retry_at =
            fo_now_ms() + fo_doubling_ms(s->claim_refusals, 1000, CLAIM_BACKOFF_MAX_MS);
        if (fo_log_repeat_due(++s->claim_refusals)) { /* the common throttle */
            char what[512];
            fo_log_quote(what, sizeof what, PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
            fo_log(FO_LOG_ERROR, fix, "op=claim error=%s refusals=%u", what, s->claim_refusals);
        }
        return 0;
    }
    s->claim_refusals = 0;
    s->claim_retry_at = 0;
    int again = s->claim_again;
    s->claim_again = 0;
    int n = PQntuples(res);
    s->plans_claimed += (uint64_t)n;
    for (int i = 0; i < n; i++)
        claim_row(s, res, i);
    /* a full batch of candidates (some left for being of an event taken): maybe more */
    int64_t candidates = 0;
    if (n > 0 && row_int64(res, 0, 15, &candidates) < 0)
        candidates = 0;
    return candidates >= asked ? 2 : again;
}

typedef struct claim_call {
    fod_store_t *s;
    int asked;
    unsigned connects; /* the connection it was sent on */
    int mine;          /* it looked for this worker's own jobs that it does not hold */
} claim_call_t;

static void on_claim(int status, const PGresult *res, void *data)
{
    claim_call_t *cc = data;
    fod_store_t *s = cc->s;
    int asked = cc->asked;
    if (status == 0 && cc->mine)
        s->mine_searched = cc->connects;
    free(cc);
    s->claiming = 0;
    if (status == FO_ESTOP)
        return;
    int more = claim_result(s, status, res, asked);
    s->ev.settled(s->ev.ctx, more); /* a stop waiting for this claim may complete now */
}

/* "{1,2,3}": a bigint[] literal of the jobs this worker holds: running here, or finished
 * with their outcome not yet written (claiming one of those again would count an attempt
 * that did not fail, or lose the outcome); or of the events of those that other jobs share
 * (split events): the claim compares every row it reads with this list, and all but a big
 * fan-out's jobs are the only job of their event. */
static char *held_array(const fod_store_t *s, const fod_held_t *held, size_t nheld, int events)
{
    fo_buf_t b = {0};
    for (size_t i = 0; i < nheld; i++)
        if (!events || held[i].parted)
            fo_buf_arr_i64(&b, events ? held[i].event_id : held[i].job_id);
    for (store_rec_t *r = s->recs; r; r = r->next)
        if (!events || r->parted)
            fo_buf_arr_i64(&b, events ? r->event_id : r->job_id);
    fo_buf_arr_end(&b);
    return b.p;
}

void fod_store_claim(fod_store_t *s, const char *worker_id, const fod_held_t *held, size_t n,
                     int want)
{
    finish_flush(s, 1); /* the done records that wait go out with the claim */
    if (!pgc_conn_ready(s->ctl) || fo_now_ms() < s->claim_retry_at || want <= 0)
        return;
    if (s->claiming) {
        s->claim_again = 1;
        return;
    }
    if (want > s->cfg->claim_batch)
        want = s->cfg->claim_batch;
    char *jobs = held_array(s, held, n, 0);
    char *events = held_array(s, held, n, 1);
    char lease[16], max[16], losses[16], limit[16];
    I64(lease, s->cfg->lease_ms);
    I64(max, s->cfg->max_attempts);
    I64(losses, s->cfg->max_lease_losses);
    I64(limit, want);
    /* this worker's own jobs that it does not hold exist only after a restart (the store's
     * first connection) or an answer lost with a connection: looked for once per connection */
    unsigned connects = pgc_conn_connects(s->ctl);
    int mine = connects != s->mine_searched;
    const char *params[] = {worker_id, lease,  jobs,  events,
                            max,       losses, limit, mine ? "true" : "false"};
    claim_call_t *cc = fo_xmalloc(sizeof *cc);
    *cc = (claim_call_t){s, want, connects, mine};
    if (pgc_conn_exec(s->ctl, "fo_claim", 8, params, 0, on_claim, cc) == 0)
        s->claiming = 1;
    else
        free(cc);
    free(jobs);
    free(events);
}

/* --- the marks' records, batched --- */

typedef struct mark_batch {
    fod_store_t *s;
    mark_call_t *calls;
} mark_batch_t;

static void mark_flush(fod_store_t *s);

/* Answers every call of the list (and frees it): written when the job's id is in res. */
static void marks_answer(fod_store_t *s, mark_call_t *calls, int status, const PGresult *res)
{
    while (calls) {
        mark_call_t *mc = calls;
        calls = mc->next;
        int st = status;
        if (st == 0 && row_of(res, mc->job_id) < 0)
            st = FO_EPG; /* the lease moved on: the renewal stops the job */
        mc->cb(st, mc->data);
        free(mc);
    }
    (void)s;
}

static void on_marked(int status, const PGresult *res, void *data)
{
    mark_batch_t *b = data;
    fod_store_t *s = b->s;
    mark_call_t *calls = b->calls;
    free(b);
    s->marking = 0;
    if (status == FO_EPG)
        s->metrics->errors[MET_PG]++;
    if (status < 0 && status != FO_ESTOP && res)
        log_pg_error("progress mark not recorded; retrying", res);
    if (status == FO_ESTOP) { /* closing: what waits for the next batch ends too */
        marks_answer(s, s->marks, FO_ESTOP, NULL);
        s->marks = NULL;
        s->marks_tail = &s->marks;
    }
    marks_answer(s, calls, status, res);
    mark_flush(s);
}

static void mark_flush(fod_store_t *s)
{
    if (s->marking || !s->marks)
        return;
    mark_batch_t *b = fo_xmalloc(sizeof *b);
    b->s = s;
    b->calls = s->marks;
    mark_call_t **tail = &s->marks;
    fo_buf_t ids = {0}, tokens = {0};
    for (int n = 0; *tail && n < s->cfg->claim_batch; n++, tail = &(*tail)->next) {
        fo_buf_arr_i64(&ids, (*tail)->job_id);
        fo_buf_arr_i64(&tokens, (*tail)->token);
    }
    s->marks = *tail; /* the rest waits for the next batch */
    *tail = NULL;
    if (!s->marks)
        s->marks_tail = &s->marks;
    const char *params[] = {fo_buf_arr_end(&ids), fo_buf_arr_end(&tokens)};
    if (pgc_conn_exec(s->ctl, "fo_marked", 2, params, 0, on_marked, b) == 0) {
        s->marking = 1;
    } else {
        marks_answer(s, b->calls, FO_EPG, NULL); /* from a reply, never from the caller */
        free(b);
    }
    fo_buf_free(&ids);
    fo_buf_free(&tokens);
}

int fod_store_record_mark(fod_store_t *s, int64_t job_id, int64_t token,
                          void (*cb)(int status, void *data), void *data)
{
    if (!pgc_conn_ready(s->ctl))
        return FO_EPG;
    mark_call_t *mc = fo_xmalloc(sizeof *mc);
    *mc = (mark_call_t){NULL, job_id, token, cb, data};
    *s->marks_tail = mc;
    s->marks_tail = &mc->next;
    mark_flush(s);
    return 0;
}

/* --- lease renewal --- */

typedef struct renew_call {
    fod_store_t *s;
    size_t n;
    fod_renewal_t jobs[];
} renew_call_t;

static void on_renew(int status, const PGresult *res, void *data)
{
    renew_call_t *rc = data;
    fod_store_t *s = rc->s;
    if (status == FO_EPG)
        s->metrics->errors[MET_PG]++;
    for (size_t i = 0; status == 0 && i < rc->n; i++)
        if (row_of(res, rc->jobs[i].job_id) < 0)
            s->ev.lease_lost(s->ev.ctx, rc->jobs[i].job_id, rc->jobs[i].token);
    free(rc);
}

void fod_store_renew(fod_store_t *s, const fod_renewal_t *jobs, size_t n)
{
    if (n == 0)
        return;
    fo_buf_t ids = {0}, tokens = {0}, cursors = {0}, delivered = {0}, waiting = {0};
    for (size_t i = 0; i < n; i++) {
        fo_buf_arr_i64(&ids, jobs[i].job_id);
        fo_buf_arr_i64(&tokens, jobs[i].token);
        fo_buf_arr_i64(&cursors, jobs[i].cursor);
        fo_buf_arr_i64(&delivered, jobs[i].delivered);
        arr_text(&waiting, jobs[i].waiting);
    }
    char lease[16];
    I64(lease, s->cfg->lease_ms);
    const char *params[] = {
        fo_buf_arr_end(&ids),     fo_buf_arr_end(&tokens),    lease,
        fo_buf_arr_end(&cursors), fo_buf_arr_end(&delivered), fo_buf_arr_end(&waiting)};
    renew_call_t *rc = fo_xmalloc(sizeof *rc + n * sizeof rc->jobs[0]);
    rc->s = s;
    rc->n = n;
    for (size_t i = 0; i < n; i++)
        rc->jobs[i] = (fod_renewal_t){jobs[i].job_id, jobs[i].token, 0, 0, NULL};
    if (pgc_conn_exec(s->ctl, "fo_renew", 6, params, 0, on_renew, rc) < 0)
        free(rc);
    fo_buf_free(&ids);
    fo_buf_free(&tokens);
    fo_buf_free(&cursors);
    fo_buf_free(&delivered);
    fo_buf_free(&waiting);
}

/* --- the oldest unfinished event --- */

typedef struct oldest_call {
    void (*cb)(int status, double seconds, void *data);
    void *data;
} oldest_call_t;

static void on_oldest(int status, const PGresult *res, void *data)
{
    oldest_call_t *oc = data;
    double seconds = 0;
    if (status == 0 && PQntuples(res) != 1)
        status = FO_EPG;
    if (status == 0)
        seconds = atof(PQgetvalue(res, 0, 0));
    oc->cb(status, seconds, oc->data);
    free(oc);
}

int fod_store_oldest(fod_store_t *s, void (*cb)(int status, double seconds, void *data), void *data)
{
    oldest_call_t *oc = fo_xmalloc(sizeof *oc);
    *oc = (oldest_call_t){cb, data};
    int rc = pgc_conn_exec(s->ctl, "fo_oldest", 0, NULL, 0, on_oldest, oc);
    if (rc < 0)
        free(oc);
    return rc;
}
