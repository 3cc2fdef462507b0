/*
 * rel_reader.c: where follower pages are read, how many at once and how fast.
 *
 * The reader owns cfg->max_page_queries read-only connections to the primary for the pages
 * of long fan-outs and cfg->first_page_queries more for jobs' first pages, and, with
 * cfg->replica_dsn, as many to a hot standby. Each connection runs at most one page query
 * at a time, so the two settings together cap the follower queries fanoutd runs on each
 * server. Requests wait in two FIFO queues, first pages and the others (at most one request
 * per job: a job reads one page at a time), so jobs share each kind of connection in arrival
 * order. A fetch is sent from an idle handle, not at once, so that the reads asked for in one
 * turn of the loop share one statement.
 *
 * Why first pages have connections of their own: most fan-outs end with their first page (an
 * author with few followers), and while a 1M fan-out streams, its next pages are always
 * queued. Sharing one connection, every small fan-out's read waited behind a 1,000-row page
 * and each small read lengthened the long fan-out's run, whose pages go through that one
 * connection one after the other (bench/loadtest --small, mixed phase). With
 * first_page_queries 0, first pages share the page connections, as they did before.
 *
 * The budget is a token bucket of cfg->read_budget_rows_s rows per second, shared by every
 * job. A page query may start when the bucket is not in debt; it reserves `limit` rows at
 * start and the unread rest is given back when the page arrives, so concurrent queries can
 * overdraw by at most one page and the rate over any longer stretch holds. Waiting is a
 * uv timer, never a sleep.
 *
 * The replica is used while it is up and its lag is known to be at most
 * cfg->replica_max_lag_ms. The lag is measured against the primary, not from the standby's
 * own replay timestamp (which reads 0 while a disconnected standby falls behind): every
 * check the primary's WAL position is sampled with its time, and the standby's replay
 * position says which sample it has not reached; the age of that sample is its lag. Going
 * back to the replica needs the lag under half the bound, so that a lag near the bound does
 * not flap. Every page read from the primary while a replica is configured counts as a
 * fallback (rel_reader_stats), and each switch is logged.
 *
 * A page is one prepared statement (REL_PAGE_SQL_FMT, the view's identifiers quoted on every
 * connect) on a read-only session: fanoutd cannot modify anything through these connections
 * even by mistake. Results come back in binary, so a page of ids is parsed without text
 * conversion straight into the caller's buffer. A request goes from the job to the reader's
 * queue to the connection's: two layers between the job and libpq.
 */
#include "relationships/rel_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_STMT "fo_followers_page"
#define PAGES_STMT "fo_followers_pages"

int64_t rel__int8_from_binary(const char *v)
{
    const unsigned char *b = (const unsigned char *)v;
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x = (x << 8) | b[i];
    return (int64_t)x;
}

/* --- the token bucket --- */

void rel__bucket_init(rel_bucket_t *b, int rows_per_s, uint64_t now_ms)
{
    b->rate = rows_per_s;
    /* a tenth of a second of burst: enough to start at once, too little to matter */
    b->cap = rows_per_s / 10.0 > 1 ? rows_per_s / 10.0 : 1;
    b->tokens = b->cap;
    b->last_ms = now_ms;
}

uint64_t rel__bucket_wait_ms(rel_bucket_t *b, uint64_t now_ms)
{
    if (b->rate <= 0)
        return 0;
    if (now_ms > b->last_ms) {
        b->tokens += (double)(now_ms - b->last_ms) * b->rate / 1000.0;
        if (b->tokens > b->cap)
            b->tokens = b->cap;
        b->last_ms = now_ms;
    }
    if (b->tokens > 0)
        return 0;
    /* until the debt is paid and one row more is in the bucket */
    return (uint64_t)((1.0 - b->tokens) * 1000.0 / b->rate) + 1;
}

void rel__bucket_take(rel_bucket_t *b, int rows)
{
    if (b->rate > 0)
        b->tokens -= rows;
}

void rel__bucket_give(rel_bucket_t *b, int rows)
{
    if (b->rate > 0 && rows > 0) {
        b->tokens += rows;
        if (b->tokens > b->cap)
            b->tokens = b->cap;
    }
}

/* --- replica lag from WAL positions --- */

int rel__lsn_parse(const char *s, uint64_t *out)
{
    unsigned hi, lo;
    char tail;
    if (!s || sscanf(s, "%X/%X%c", &hi, &lo, &tail) != 2)
        return -1;
    *out = ((uint64_t)hi << 32) | lo;
    return 0;
}

void rel__lag_sample(rel_lag_t *l, uint64_t now_ms, uint64_t lsn)
{
    /* samples with the same position add nothing: keep the oldest time for it */
    if (l->n > 0 && l->lsn[(l->head + l->n - 1) % REL_LAG_SAMPLES] == lsn)
        return;
    if (l->n == REL_LAG_SAMPLES) {
        l->head = (l->head + 1) % REL_LAG_SAMPLES;
        l->n--;
    }
    int i = (l->head + l->n) % REL_LAG_SAMPLES;
    l->ms[i] = now_ms;
    l->lsn[i] = lsn;
    l->n++;
}

int64_t rel__lag_ms(const rel_lag_t *l, uint64_t replay_lsn, uint64_t now_ms)
{
    if (l->n == 0)
        return -1;
    /* the oldest primary position the standby has not replayed: it is at least that old */
    for (int k = 0; k < l->n; k++) {
        int i = (l->head + k) % REL_LAG_SAMPLES;
        if (l->lsn[i] > replay_lsn)
            return now_ms > l->ms[i] ? (int64_t)(now_ms - l->ms[i]) : 0;
    }
    return 0;
}

/* --- the reader --- */

typedef struct req {
    struct req *next;
    rel_reader_t *r;
    int64_t author, after, upto;
    int limit;
    int64_t *out;
    rel_page_cb cb;
    void *data;
    int replica, slot;
    int solo;  /* its batch was refused: read alone, so that a bad read fails alone */
    int first; /* a job's first page: queued and sent apart from the others */
    uint64_t queued_ns, sent_ns; /* fetch called; query sent (after the budget, a slot) */
    char why[160];               /* a message of our own, when err is not the server's */
} req_t;

/* Connections [0, pages) of a pool take the pages queue; [pages, n) the first-page queue. */
typedef struct pool {
    pgc_conn_t **conns;
    int *busy;
    int n, pages;
} pool_t;

typedef struct queue {
    req_t *head, *tail;
} queue_t;

struct rel_reader {
    uv_loop_t *loop;
    const cfg_t *cfg;
    rel_reader_state_cb on_state;
    void *data;
    pool_t primary, replica;
    int reported_up;       /* the last usable() given to on_state */
    queue_t pages, firsts; /* what waits for a page connection, and for a first-page one */
    rel_bucket_t bucket;
    uv_timer_t budget_timer, lag_timer;
    uv_idle_t gather; /* active while fetches of this loop turn wait to be sent together */
    int open_parts;   /* handles and connections not closed yet, once closing */
    int closing;
    fo_closed_cb on_closed;
    void *closed_data;

    rel_lag_t lag;
    int lag_primary_busy, lag_replica_busy;
    int replica_usable;
    int64_t replica_lag_ms;
    uint64_t lag_checked_ms; /* when the standby last answered a lag check */
    int not_standby;         /* the replica DSN names a server not in recovery */
    const char *why;         /* why the replica is not used now (a static string) */
    rel_reader_stats_t stats;
    rel_timing_cb on_timing;
    void *timing_data;
};

static void dispatch(rel_reader_t *r);

static int pool_ready(const pool_t *p)
{
    for (int i = 0; i < p->n; i++)
        if (pgc_conn_ready(p->conns[i]))
            return 1;
    return 0;
}

/* The connection of p a side query (the split's bounds, the lag check) goes on: an idle one,
 * first-page ones first, else a first-page one, else any that is up; NULL when none is. A
 * side query is a few index probes, but queued behind a long fan-out's page it would wait as
 * long as that page does (a split question then holds its job's first page for a whole page
 * read). busy[] counts page reads only, so a side query's connection still looks idle: the
 * next first pages may queue behind it there, which costs them one short query. */
static pgc_conn_t *side_conn(const pool_t *p)
{
    int best = -1, best_rank = -1;
    for (int i = 0; i < p->n; i++) {
        if (!pgc_conn_ready(p->conns[i]))
            continue;
        int rank = 2 * !p->busy[i] + (i >= p->pages);
        if (rank > best_rank) {
            best = i;
            best_rank = rank;
        }
    }
    return best < 0 ? NULL : p->conns[best];
}

static int check_interval_ms(const cfg_t *cfg)
{
    int ms = cfg->replica_max_lag_ms / 4;
    return ms < 50 ? 50 : ms > 1000 ? 1000 : ms;
}

static int usable(const rel_reader_t *r)
{
    return pool_ready(&r->primary) || (r->replica_usable == 1 && pool_ready(&r->replica));
}

/* The owner hears "pages can be read" or not, once per change, whatever changed it: a
 * connection (primary or replica) that came or went, or the lag check judging the replica. */
static void report_state(rel_reader_t *r)
{
    int now = usable(r);
    if (r->on_state && now != r->reported_up) {
        r->reported_up = now;
        r->on_state(r, now, r->data);
    }
}

/* Decides whether pages come from the replica now (logging each switch), then sends what
 * waits and reports a change of "pages can be read". */
static void judge_replica(rel_reader_t *r)
{
    if (r->replica.n == 0) {
        dispatch(r);
        report_state(r);
        return;
    }
    uint64_t now = fo_now_ms();
    const char *why = NULL;
    int64_t bound = r->cfg->replica_max_lag_ms;
    if (!pool_ready(&r->replica))
        why = "down";
    else if (r->not_standby)
        why = "not a hot standby";
    else if (r->replica_lag_ms < 0 ||
             now - r->lag_checked_ms > (uint64_t)(3 * check_interval_ms(r->cfg) + 2000))
        why = "lag unknown";
    else if (r->replica_lag_ms > (r->replica_usable == 1 ? bound : bound / 2))
        why = "lagging";
    int usable = why == NULL;
    if (usable != r->replica_usable || (why && why != r->why)) {
        if (usable)
            fo_log(FO_LOG_INFO, "replica usable; reading follower pages from it",
                   "lag_ms=%" PRId64 " fallback_pages=%" PRIu64, r->replica_lag_ms,
                   r->stats.fallback_pages);
        else
            fo_log(FO_LOG_WARN, "replica unusable; reading follower pages from the primary",
                   "reason=\"%s\" lag_ms=%" PRId64 " max_lag_ms=%" PRId64
                   " fallback_pages=%" PRIu64,
                   why, r->replica_lag_ms, bound, r->stats.fallback_pages);
        r->stats.fallbacks += !usable && r->replica_usable == 1;
    }
    r->replica_usable = usable;
    r->why = why;
    r->stats.replica_usable = usable;
    r->stats.replica_lag_ms = r->replica_lag_ms;
    dispatch(r);
    report_state(r);
}

static void on_primary_lsn(int status, const PGresult *res, void *data)
{
    rel_reader_t *r = data;
    r->lag_primary_busy = 0;
    uint64_t lsn;
    if (status == 0 && PQntuples(res) == 1 && rel__lsn_parse(PQgetvalue(res, 0, 0), &lsn) == 0)
        rel__lag_sample(&r->lag, fo_now_ms(), lsn);
}

static void on_replica_lsn(int status, const PGresult *res, void *data)
{
    rel_reader_t *r = data;
    r->lag_replica_busy = 0;
    if (status == FO_ESTOP || r->closing)
        return;
    uint64_t lsn;
    if (status == 0 && PQntuples(res) == 1) {
        r->lag_checked_ms = fo_now_ms();
        r->not_standby =
            PQgetvalue(res, 0, 0)[0] != 't' || rel__lsn_parse(PQgetvalue(res, 0, 1), &lsn) < 0;
        r->replica_lag_ms = r->not_standby ? -1 : rel__lag_ms(&r->lag, lsn, fo_now_ms());
    }
    judge_replica(r);
}

static void on_lag_timer(uv_timer_t *t)
{
    rel_reader_t *r = t->data;
    pgc_conn_t *c = r->lag_primary_busy ? NULL : side_conn(&r->primary);
    if (c &&
        pgc_conn_query(c, "SELECT pg_current_wal_lsn()::text", 0, NULL, on_primary_lsn, r) == 0)
        r->lag_primary_busy = 1;
    c = r->lag_replica_busy ? NULL : side_conn(&r->replica);
    if (c && pgc_conn_query(c, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text", 0,
                            NULL, on_replica_lsn, r) == 0)
        r->lag_replica_busy = 1;
    judge_replica(r);
}

/* The queue q waits in: first pages wait apart when connections of their own serve them. */
static queue_t *queue_of(rel_reader_t *r, const req_t *q)
{
    return q->first && r->cfg->first_page_queries > 0 ? &r->firsts : &r->pages;
}

/* The queue connection `slot` of p serves. */
static queue_t *queue_for(rel_reader_t *r, const pool_t *p, int slot)
{
    return slot < p->pages ? &r->pages : &r->firsts;
}

static void queue_push(queue_t *qu, req_t *q)
{
    q->next = NULL;
    if (qu->tail)
        qu->tail->next = q;
    else
        qu->head = q;
    qu->tail = q;
}

/* Fails the queued requests (none is on the wire) with status. */
static void fail_queued(rel_reader_t *r, int status)
{
    queue_t *queues[] = {&r->pages, &r->firsts};
    for (int k = 0; k < 2; k++) {
        req_t *list = queues[k]->head;
        queues[k]->head = queues[k]->tail = NULL;
        while (list) {
            req_t *q = list;
            list = q->next;
            q->cb(status, q->out, 0, NULL, q->data);
            free(q);
        }
    }
}

static void on_conn_state(pgc_conn_t *c, int up, void *data)
{
    rel_reader_t *r = data;
    if (!up && !usable(r))
        fail_queued(r, FO_EPG);
    judge_replica(r); /* dispatches and reports */
}

static int page_error(int status, const PGresult *res, const char **err);

/* Appends id to q's page (q->out holds *n ids): 0, or FO_EQUERY when it is not above the
 * last one (a view that repeats a follower would make the page unwritable forever: the
 * attempt fails with a message for the owner) or over the limit. */
static int page_add(req_t *q, size_t *n, int64_t id)
{
    if ((*n > 0 && id <= q->out[*n - 1]) || *n >= (size_t)q->limit) {
        snprintf(q->why, sizeof q->why,
                 "the contract view returned follower %lld twice or out of order;"
                 " it must return each follower once (fix the view)",
                 (long long)id);
        return FO_EQUERY;
    }
    q->out[(*n)++] = id;
    return 0;
}

/*
 * Turns a page query's result into ids in q->out: status 0, or FO_ECONTRACT, FO_EQUERY or
 * FO_EPG (see rel_page_cb) with *err set for the first two. *n is the number of ids.
 */
static int parse_page(req_t *q, int status, const PGresult *res, size_t *n, const char **err)
{
    *n = 0;
    *err = NULL;
    if (status == 0) {
        int rows = PQntuples(res);
        if (PQnfields(res) != 1 || PQftype(res, 0) != 20 /* int8 */ || rows > q->limit) {
            fo_log(FO_LOG_ERROR,
                   "contract view returned an unexpected shape: one bigint follower column "
                   "expected",
                   "fields=%d rows=%d limit=%d", PQnfields(res), rows, q->limit);
            *err = "the contract view's follower column is not bigint";
            return FO_ECONTRACT;
        }
        for (int i = 0; i < rows; i++) {
            if (page_add(q, n, rel__int8_from_binary(PQgetvalue(res, i, 0))) < 0) {
                *err = q->why;
                *n = 0;
                return FO_EQUERY;
            }
        }
        return 0;
    }
    return page_error(status, res, err);
}

/* A failed page query: FO_EPG (lost, or an error of the moment), FO_ESTOP, FO_ECONTRACT or
 * FO_EQUERY, with *err set for the last two. */
static int page_error(int status, const PGresult *res, const char **err)
{
    *err = NULL;
    if (!res)
        return status; /* lost (FO_EPG) or closing (FO_ESTOP) */
    /* Errors of the moment (a standby's recovery conflict, lack of resources, a server
     * shutting down or a lost connection) wait like a lost connection; a view that changed
     * under the query pauses the work (the daemon checks the contract); anything else (a
     * statement or lock timeout, an error in the view's data) fails the attempt. */
    pgc_err_kind_t kind = pgc_err_classify_result(res);
    *err = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    if (!*err)
        *err = "unknown error";
    char what[512];
    fo_log_quote(what, sizeof what, *err);
    fo_log(FO_LOG_WARN, "follower page query failed", "error=%s", what);
    if (kind == PGC_ERR_TRANSIENT) {
        *err = NULL;
        return FO_EPG;
    }
    return kind == PGC_ERR_CONTRACT ? FO_ECONTRACT : FO_EQUERY;
}

/* One read answered (status and n from its query's result): account for it, hand it to its
 * job and free it. */
static void page_done(rel_reader_t *r, req_t *q, int status, size_t n, const char *err)
{
    if (r->on_timing && status != FO_ESTOP) {
        uint64_t now = uv_hrtime();
        r->on_timing((double)(q->sent_ns - q->queued_ns) / 1e9, (double)(now - q->sent_ns) / 1e9,
                     r->timing_data);
    }
    rel__bucket_give(&r->bucket, q->limit - (int)n);
    if (status == 0) {
        r->stats.rows += n;
        if (q->replica)
            r->stats.replica_pages++;
        else
            r->stats.primary_pages++;
        if (!q->replica && r->replica.n > 0)
            r->stats.fallback_pages++;
    }
    q->cb(status, q->out, n, err, q->data);
    free(q);
}

static void on_page(int status, const PGresult *res, void *data)
{
    req_t *q = data;
    rel_reader_t *r = q->r;
    size_t n;
    const char *err;
    status = parse_page(q, status, res, &n, &err);
    pool_t *p = q->replica ? &r->replica : &r->primary;
    p->busy[q->slot] = 0;
    page_done(r, q, status, n, err);
    if (!r->closing)
        dispatch(r);
}

/* Several reads in one query (REL_PAGES_SQL_FMT), in the order they were queued. */
typedef struct batch {
    rel_reader_t *r;
    int replica, slot, n;
    req_t *reqs[];
} batch_t;

static void on_pages(int status, const PGresult *res, void *data)
{
    batch_t *b = data;
    rel_reader_t *r = b->r;
    (b->replica ? &r->replica : &r->primary)->busy[b->slot] = 0;
    const char *err = NULL;
    size_t *got = fo_xcalloc((size_t)b->n, sizeof *got);
    int *bad = fo_xcalloc((size_t)b->n, sizeof *bad);
    if (status == 0 && (PQnfields(res) != 2 || PQftype(res, 0) != 20 || PQftype(res, 1) != 20)) {
        fo_log(FO_LOG_ERROR,
               "contract view returned an unexpected shape: one bigint follower column expected",
               "fields=%d", PQnfields(res));
        err = "the contract view's follower column is not bigint";
        status = FO_ECONTRACT;
    } else if (status == 0) {
        for (int row = 0; row < PQntuples(res); row++) {
            int64_t i = rel__int8_from_binary(PQgetvalue(res, row, 0)) - 1;
            if (i < 0 || i >= b->n)
                continue; /* cannot be: the query numbers its reads */
            if (!bad[i] &&
                page_add(b->reqs[i], &got[i], rel__int8_from_binary(PQgetvalue(res, row, 1))) < 0)
                bad[i] = 1;
        }
    } else {
        status = page_error(status, res, &err);
    }
    if (status == FO_EQUERY && b->n > 1) {
        /* which read the server refuses (a timeout, an error in one author's rows) only a
         * read alone can say: back to the head of the queue, each to be read alone */
        for (int i = b->n - 1; i >= 0; i--) {
            req_t *q = b->reqs[i];
            queue_t *qu = queue_of(r, q);
            rel__bucket_give(&r->bucket, q->limit);
            q->solo = 1;
            q->next = qu->head;
            qu->head = q;
            if (!qu->tail)
                qu->tail = q;
        }
    } else {
        for (int i = 0; i < b->n; i++) {
            req_t *q = b->reqs[i];
            if (status == 0 && bad[i])
                page_done(r, q, FO_EQUERY, 0, q->why);
            else
                page_done(r, q, status, status == 0 ? got[i] : 0, err);
        }
    }
    free(got);
    free(bad);
    free(b);
    if (!r->closing)
        dispatch(r);
}

/* Sends the reads at the head of qu that one query serves (up to page_batch; a read whose
 * batch was refused goes alone) on connection `slot` of p. */
static void send_reads(rel_reader_t *r, queue_t *qu, pool_t *p, int replica, int slot)
{
    /* with a read budget, a batch takes reads only while the bucket still holds rows for
     * them: the first may overdraw, as a lone read does, but one statement must not draw
     * page_batch pages of budget at once */
    int n = 0;
    double left = r->bucket.tokens;
    for (req_t *q = qu->head; q && n < r->cfg->page_batch && !(n > 0 && q->solo); q = q->next) {
        if (n > 0 && r->bucket.rate > 0 && left <= 0)
            break;
        left -= q->limit;
        n++;
        if (q->solo)
            break;
    }
    req_t *first = qu->head;
    uint64_t now = uv_hrtime();
    batch_t *b = n > 1 ? fo_xmalloc(sizeof *b + (size_t)n * sizeof b->reqs[0]) : NULL;
    fo_buf_t authors = {0}, afters = {0}, uptos = {0}, limits = {0};
    for (int i = 0; i < n; i++) {
        req_t *q = qu->head;
        qu->head = q->next;
        q->next = NULL;
        q->replica = replica;
        q->slot = slot;
        q->sent_ns = now;
        rel__bucket_take(&r->bucket, q->limit);
        if (b) {
            b->reqs[i] = q;
            fo_buf_arr_i64(&authors, q->author);
            fo_buf_arr_i64(&afters, q->after);
            fo_buf_arr_i64(&uptos, q->upto);
            fo_buf_arr_i64(&limits, q->limit);
        }
    }
    if (!qu->head)
        qu->tail = NULL;
    p->busy[slot] = 1;
    int rc;
    if (b) {
        *b = (batch_t){.r = r, .replica = replica, .slot = slot, .n = n};
        const char *params[] = {fo_buf_arr_end(&authors), fo_buf_arr_end(&afters),
                                fo_buf_arr_end(&uptos), fo_buf_arr_end(&limits)};
        rc = pgc_conn_exec(p->conns[slot], PAGES_STMT, 4, params, 1, on_pages, b);
    } else {
        char author[24], after[24], upto[24], limit[16];
        snprintf(author, sizeof author, "%" PRId64, first->author);
        snprintf(after, sizeof after, "%" PRId64, first->after);
        snprintf(upto, sizeof upto, "%" PRId64, first->upto);
        snprintf(limit, sizeof limit, "%d", first->limit);
        const char *params[] = {author, after, upto, limit};
        rc = pgc_conn_exec(p->conns[slot], PAGE_STMT, 4, params, 1, on_page, first);
    }
    fo_buf_free(&authors);
    fo_buf_free(&afters);
    fo_buf_free(&uptos);
    fo_buf_free(&limits);
    if (rc == 0)
        return;
    p->busy[slot] = 0;
    for (int i = 0; i < n; i++) {
        req_t *q = b ? b->reqs[i] : first;
        rel__bucket_give(&r->bucket, q->limit);
        q->cb(FO_EPG, q->out, 0, NULL, q->data);
        free(q);
    }
    free(b);
}

static void on_budget_timer(uv_timer_t *t)
{
    dispatch(t->data);
}

/* The fetches made in one turn of the loop (a claim's jobs ask for their pages from one
 * callback) go out together: sent at once, the first would take the idle connection alone
 * and the rest wait for it, two statements where one serves (and two page writes). */
static void on_gather(uv_idle_t *h)
{
    uv_idle_stop(h);
    dispatch(h->data);
}

/* Whether a connection of p that serves qu is up. */
static int kind_ready(rel_reader_t *r, const pool_t *p, const queue_t *qu)
{
    for (int i = 0; i < p->n; i++)
        if (queue_for(r, p, i) == qu && pgc_conn_ready(p->conns[i]))
            return 1;
    return 0;
}

/* What idle connection `slot` of p sends now: its own queue's head or, while no connection
 * of the other kind is up, whichever of the two heads is older (a first-page connection that
 * cannot connect, a role's CONNECTION LIMIT say, must not leave small fan-outs waiting for as
 * long as a long one keeps its next page queued); NULL: nothing. */
static queue_t *serves(rel_reader_t *r, const pool_t *p, int slot)
{
    if (p->busy[slot] || !pgc_conn_ready(p->conns[slot]))
        return NULL;
    queue_t *own = queue_for(r, p, slot);
    queue_t *other = own == &r->pages ? &r->firsts : &r->pages;
    if (other->head && !kind_ready(r, p, other) &&
        (!own->head || other->head->queued_ns < own->head->queued_ns))
        return other;
    return own->head ? own : NULL;
}

static void dispatch(rel_reader_t *r)
{
    while ((r->pages.head || r->firsts.head) && !r->closing) {
        uint64_t wait = rel__bucket_wait_ms(&r->bucket, fo_now_ms());
        if (wait > 0) {
            if (!uv_is_active((uv_handle_t *)&r->budget_timer))
                uv_timer_start(&r->budget_timer, on_budget_timer, wait, 0);
            return;
        }
        int replica = r->replica_usable == 1 && pool_ready(&r->replica);
        pool_t *p = replica ? &r->replica : &r->primary;
        /* the oldest read first, whichever its queue: under a read budget, the reads the
         * budget lets through go in the order they were asked for, so a long fan-out whose
         * next page is always queued does not take every row of it */
        int slot = -1;
        queue_t *best = NULL;
        for (int i = 0; i < p->n; i++) {
            queue_t *qu = serves(r, p, i);
            if (qu && (!best || qu->head->queued_ns < best->head->queued_ns)) {
                slot = i;
                best = qu;
            }
        }
        if (!best)
            return; /* busy, or down: the next page to arrive (or connection up) dispatches */
        send_reads(r, best, p, replica, slot);
    }
}

/* name names the page connections, first_name the first-page ones (application_name). */
static void pool_open(rel_reader_t *r, pool_t *p, const char *dsn, const char *name,
                      const char *first_name)
{
    p->pages = r->cfg->max_page_queries;
    p->n = p->pages + r->cfg->first_page_queries;
    p->conns = fo_xcalloc((size_t)p->n, sizeof *p->conns);
    p->busy = fo_xcalloc((size_t)p->n, sizeof *p->busy);
    for (int i = 0; i < p->n; i++) {
        p->conns[i] = pgc_conn_new(r->loop, r->cfg, dsn, i < p->pages ? name : first_name,
                                   on_conn_state, NULL, r);
        pgc_conn_setup_limits(p->conns[i], r->cfg);
        pgc_conn_setup(p->conns[i], "SET default_transaction_read_only = on");
        pgc_conn_prepare_view(p->conns[i], PAGE_STMT, REL_PAGE_SQL_FMT, 4, r->cfg);
        pgc_conn_prepare_view(p->conns[i], PAGES_STMT, REL_PAGES_SQL_FMT, 4, r->cfg);
    }
}

rel_reader_t *rel_reader_new(uv_loop_t *loop, const cfg_t *cfg, rel_reader_state_cb on_state,
                             void *data)
{
    rel_reader_t *r = fo_xcalloc(1, sizeof *r);
    r->loop = loop;
    r->cfg = cfg;
    r->on_state = on_state;
    r->data = data;
    r->replica_lag_ms = -1;
    r->replica_usable = -1; /* unknown: the first judgement is logged */
    rel__bucket_init(&r->bucket, cfg->read_budget_rows_s, fo_now_ms());
    uv_timer_init(loop, &r->budget_timer);
    uv_timer_init(loop, &r->lag_timer);
    uv_idle_init(loop, &r->gather);
    r->budget_timer.data = r->lag_timer.data = r->gather.data = r;
    pool_open(r, &r->primary, cfg->pg_dsn, "fanoutd-pages", "fanoutd-first-pages");
    if (cfg->replica_dsn[0])
        pool_open(r, &r->replica, cfg->replica_dsn, "fanoutd-replica", "fanoutd-replica-first");
    return r;
}

void rel_reader_start(rel_reader_t *r)
{
    for (int i = 0; i < r->primary.n; i++)
        pgc_conn_start(r->primary.conns[i]);
    for (int i = 0; i < r->replica.n; i++)
        pgc_conn_start(r->replica.conns[i]);
    if (r->replica.n > 0) {
        uint64_t every = (uint64_t)check_interval_ms(r->cfg);
        uv_timer_start(&r->lag_timer, on_lag_timer, every, every);
        fo_log(FO_LOG_INFO, "follower pages from a replica while it keeps up",
               "max_lag_ms=%d check_ms=%" PRIu64, r->cfg->replica_max_lag_ms, every);
    }
}

int rel_reader_fetch(rel_reader_t *r, int64_t author, int64_t after, int64_t upto, int limit,
                     int first, int64_t *out, rel_page_cb cb, void *data)
{
    if (r->closing || !usable(r))
        return FO_EPG;
    req_t *q = fo_xcalloc(1, sizeof *q);
    *q = (req_t){.r = r,
                 .author = author,
                 .after = after,
                 .upto = upto,
                 .limit = limit,
                 .first = first,
                 .out = out,
                 .cb = cb,
                 .data = data,
                 .queued_ns = uv_hrtime()};
    queue_push(queue_of(r, q), q);
    uv_idle_start(&r->gather, on_gather); /* no-op while already started */
    return 0;
}

void rel_reader_set_timing(rel_reader_t *r, rel_timing_cb cb, void *data)
{
    r->on_timing = cb;
    r->timing_data = data;
}

void rel_reader_stats(const rel_reader_t *r, rel_reader_stats_t *out)
{
    *out = r->stats;
}

/* One handle or connection closed; the last one frees the reader and reports. */
static void on_part_closed(void *data)
{
    rel_reader_t *r = data;
    if (--r->open_parts > 0)
        return;
    fo_closed_cb on_closed = r->on_closed;
    void *closed_data = r->closed_data;
    free(r->primary.conns);
    free(r->primary.busy);
    free(r->replica.conns);
    free(r->replica.busy);
    free(r);
    if (on_closed)
        on_closed(closed_data);
}

static void on_handle_closed(uv_handle_t *h)
{
    on_part_closed(h->data);
}

void rel_reader_close(rel_reader_t *r, fo_closed_cb on_closed, void *data)
{
    if (r->closing)
        return;
    r->closing = 1;
    r->on_closed = on_closed;
    r->closed_data = data;
    r->open_parts = 3 + r->primary.n + r->replica.n;
    const rel_reader_stats_t *s = &r->stats;
    fo_log(FO_LOG_INFO, "follower reads",
           "rows=%" PRIu64 " primary_pages=%" PRIu64 " replica_pages=%" PRIu64
           " fallback_pages=%" PRIu64 " fallbacks=%" PRIu64,
           s->rows, s->primary_pages, s->replica_pages, s->fallback_pages, s->fallbacks);
    fail_queued(r, FO_ESTOP);
    for (int i = 0; i < r->primary.n; i++)
        pgc_conn_close(r->primary.conns[i], on_part_closed, r);
    for (int i = 0; i < r->replica.n; i++)
        pgc_conn_close(r->replica.conns[i], on_part_closed, r);
    uv_close((uv_handle_t *)&r->budget_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->lag_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->gather, on_handle_closed);
}

int rel_reader_query_view(rel_reader_t *r, const char *sql_fmt, int nparams,
                          const char *const *params, pgc_result_cb cb, void *data)
{
    /* the primary: the freshest answer, and no budget (a query of a few index probes) */
    pgc_conn_t *c = side_conn(&r->primary);
    return c ? pgc_conn_query_view(c, sql_fmt, r->cfg, nparams, params, cb, data) : FO_EPG;
}
