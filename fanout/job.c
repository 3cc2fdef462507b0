/*
 * job.c: one job's state machine, from its progress mark to done.
 *
 * The job reads follower pages one at a time into its single page buffer and writes each
 * page to Redis as one atomic unit that also advances the progress mark. Up to cfg->window
 * writes are in flight; each carries the cursor it expects, so pipelined pages apply in
 * order and a page that was applied already can never apply again. Reading the next page
 * overlaps the writes in flight (the notifier copies a page into its command when sent, so
 * the buffer is free again at once).
 *
 * Whenever the job loses track of what Redis applied (a lost connection, a refused write,
 * a mark that moved), it forgets its pipeline and fences again: Redis's mark is the truth,
 * and the job resumes right after it. A mark is the truth only while it exists and is not
 * behind PostgreSQL's checkpoint: once a page was written (PostgreSQL recorded progress, or
 * this job saw a mark), the fence must find the mark, and a missing or older one makes the
 * job fail, fatally, instead of starting the range over (which would repeat what the
 * streams hold). A page Redis refuses because a key has the wrong type wrote nothing: the
 * job waits, says why once per FOD_WAIT_LOG_MS, and resumes when a fence works again. The `epoch`
 * counter makes the replies of a forgotten pipeline harmless: they still arrive (and are counted in
 * `outstanding`, which must reach zero before the job reports itself finished), but change nothing.
 *
 * Memory: one page buffer of cfg->page_size ids, whatever the follower count.
 */
#include "fanout/fod_int.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define FOD_WAIT_LOG_MS 10000 /* a job waiting for the same reason says so once per interval */

struct fod_job {
    fod_job_io_t io;
    const cfg_t *cfg;
    int64_t job_id, event_id, author, token, range_lo, range_hi;
    char *kind, *payload, *created_at;

    fod_job_state_t state;
    unsigned epoch;
    int outstanding; /* io calls whose callback has not run yet, of any epoch */
    unsigned failures;
    uint64_t retry_at;

    /* confirmed by Redis */
    int64_t acked_cursor, delivered;

    /* the pipeline of the current epoch */
    int64_t read_cursor; /* the next page starts after this id */
    int64_t sent_cursor; /* the expect_cursor of the next write */
    int eof;             /* the last page has been read */
    int reading;         /* a read is in flight (possibly of an older epoch) */
    int ready;           /* the buffer holds a page not yet sent */
    size_t ready_n;
    int inflight; /* writes of this epoch not yet answered */
    int64_t *page;
    char *error;     /* FAILED: the server's message */
    int page_size;   /* the buffer's size: cfg->page_size when created (SIGHUP may change it) */
    int64_t counted; /* delivered entries already added to metrics->notifications */
    int have_base;   /* counted holds the mark found by the first fence (earlier owners') */
    int64_t pg_progress, pg_delivered; /* PostgreSQL's checkpoint at the claim */
    int pg_marked;                     /* PostgreSQL knows the mark exists */
    int split_candidate; /* a full first page asks whether to split (fod_job_io_t.split) */
    int split_asked; /* a split's answer is awaited or unknown: other jobs of its event may exist */
    int early;       /* EARLY_*: the first page read while the fence is out */
    size_t early_n;  /* EARLY_HELD: its ids in the buffer */
    unsigned early_epoch;    /* EARLY_READING: the epoch its answer belongs to, once fenced */
    int whole;               /* WHOLE_*: a fresh job's one-page way (fod_job_start) */
    ntf_progress_t fenced;   /* the mark a fence found, while that is recorded */
    int fatal;               /* FAILED over the progress mark: dead until fanoutctl retry */
    char *waiting;           /* WAITING: why; NULL otherwise */
    uint64_t wait_logged_ms; /* when the waiting reason was last logged */
};

/* A fresh job (no page of its range can have been written) reads its first page while it
 * fences: the page is written only once the fence (and the mark's record) answered with the
 * mark at the range's start, as it must be for such a job; otherwise it is dropped. */
enum { EARLY_NONE, EARLY_READING, EARLY_HELD };

/* A fresh job with io->write_whole reads its first page before anything else. A short page
 * (the job's every follower) is written whole, fence and finish included (WHOLE_HELD while
 * backpressure holds it, WHOLE_WRITING while out); a full one goes the long way: fence, mark
 * record, split question, pages. */
enum { WHOLE_NONE, WHOLE_READING, WHOLE_HELD, WHOLE_WRITING };

typedef struct job_call {
    fod_job_t *job;
    unsigned epoch;
    uint64_t sent_ns; /* for the latency histograms */
    size_t split_n;   /* a split's question: the ids of the first page in the buffer */
    int early;        /* a read sent before the fence answered */
} job_call_t;

static const char *const state_names[] = {"fencing", "running", "waiting", "draining",
                                          "done",    "fenced",  "stopped", "failed"};

static void pump(fod_job_t *j);
static void fence(fod_job_t *j);

/* A page of this range may have been written: PostgreSQL recorded the mark or checkpointed
 * progress, or this job has seen the mark (a fence answered). A fence may then never create
 * the mark afresh. */
static int mark_required(const fod_job_t *j)
{
    return j->pg_marked || j->pg_delivered > 0 || j->pg_progress > j->range_lo || j->have_base;
}

static ntf_job_t ntf_view(const fod_job_t *j)
{
    return (ntf_job_t){.job_id = j->job_id,
                       .event_id = j->event_id,
                       .author = j->author,
                       .token = j->token,
                       .kind = j->kind,
                       .payload = j->payload,
                       .created_at = j->created_at,
                       .mark_required = mark_required(j)};
}

static job_call_t *call_new(fod_job_t *j)
{
    job_call_t *c = fo_xmalloc(sizeof *c);
    c->job = j;
    c->epoch = j->epoch;
    c->sent_ns = uv_hrtime();
    c->split_n = 0;
    c->early = 0;
    return c;
}

static int terminal(fod_job_state_t s)
{
    return s == FOD_JOB_DONE || s == FOD_JOB_FENCED || s == FOD_JOB_STOPPED || s == FOD_JOB_FAILED;
}

/* Reports the job finished once nothing of it is in flight; must be the caller's last act. */
static void maybe_finish(fod_job_t *j)
{
    if (j->outstanding > 0)
        return;
    if (j->state == FOD_JOB_DRAINING)
        j->state = FOD_JOB_STOPPED;
    if (terminal(j->state))
        j->io.finished(j->io.ctx, j);
}

/*
 * Counts entries Redis confirmed: the growth of the mark's delivered count since last seen.
 * The first mark a job sees (its first fence) is its base: entries written before this claim
 * (by a crashed worker, say) are not this process's work. Later adoptions of a mark (after a
 * lost reply) count what this process wrote but never saw acknowledged.
 */
static void note_delivered(fod_job_t *j, int64_t delivered)
{
    if (!j->have_base) {
        j->have_base = 1;
        j->counted = delivered;
        return;
    }
    if (delivered > j->counted) {
        if (j->io.metrics)
            j->io.metrics->notifications += (uint64_t)(delivered - j->counted);
        j->counted = delivered;
    }
}

static double seconds_since(uint64_t ns)
{
    return (double)(uv_hrtime() - ns) / 1e9;
}

/* Takes back a call's context; returns 1 if the reply belongs to the current epoch. */
static int call_done(job_call_t *c, fod_job_t **out)
{
    fod_job_t *j = c->job;
    int current = c->epoch == j->epoch;
    free(c);
    j->outstanding--;
    *out = j;
    return current;
}

/* Forget the pipeline: replies still in flight will be ignored. */
static void reset_pipeline(fod_job_t *j, int64_t cursor)
{
    j->epoch++;
    j->read_cursor = j->sent_cursor = cursor;
    j->eof = 0;
    j->ready = 0;
    j->inflight = 0;
    j->early = EARLY_NONE; /* an early page no longer belongs to this pipeline */
    j->whole = WHOLE_NONE; /* and a retry goes the long way: fence first */
}

/* Waits for the retry time (jittered, growing up to reconnect_max_ms). One line when the
 * reason is new, then at most one per FOD_WAIT_LOG_MS however often the retry fails. */
static void go_wait(fod_job_t *j, const char *why)
{
    reset_pipeline(j, j->acked_cursor);
    j->state = FOD_JOB_WAITING;
    uint64_t now = fo_now_ms();
    j->retry_at = now + fo_backoff_ms(j->failures, (uint64_t)j->cfg->reconnect_max_ms);
    j->failures++;
    int same = j->waiting && strcmp(j->waiting, why) == 0;
    if (!same) {
        free(j->waiting);
        j->waiting = fo_xstrdup(why);
    }
    if (same && now - j->wait_logged_ms < FOD_WAIT_LOG_MS)
        return;
    j->wait_logged_ms = now;
    char q[512];
    fo_log(FO_LOG_WARN, "job waiting to retry",
           "job=%" PRId64 " event=%" PRId64 " reason=%s attempt=%u", j->job_id, j->event_id,
           fo_log_quote(q, sizeof q, why), j->failures);
}

/* Redis applied a page: whatever the job waited for is over. Not on a fence: a fence
 * touches the mark alone, so it succeeds while a stream key is still wrong-typed, and
 * clearing there would log a wait and a resume per retry. */
static void stop_waiting(fod_job_t *j)
{
    if (!j->waiting)
        return;
    fo_log(FO_LOG_INFO, "job resumes", "job=%" PRId64 " event=%" PRId64 " waited_for=\"%.80s\"",
           j->job_id, j->event_id, j->waiting);
    free(j->waiting);
    j->waiting = NULL;
}

/* The mark is missing or behind PostgreSQL: starting over would repeat what the streams
 * hold, so the job fails for good and says how to go on. */
static void fail_mark(fod_job_t *j, const char *what, const ntf_progress_t *p)
{
    char mark[96];
    if (p)
        snprintf(mark, sizeof mark, "at cursor %" PRId64 " with %" PRId64 " delivered", p->cursor,
                 p->delivered);
    else
        snprintf(mark, sizeof mark, "gone");
    free(j->error);
    j->error = fo_xasprintf(
        "progress mark %s:{*}:progress:%" PRId64
        " %s (%s) while PostgreSQL recorded cursor %" PRId64 " with %" PRId64
        " delivered and this worker %" PRId64 ": it was deleted, evicted or lost in"
        " a failover; not replaying the range. Fix Redis, then fanoutctl retry %" PRId64
        " rebuilds the cursor from the streams",
        j->cfg->key_prefix, j->job_id, what, mark, j->pg_progress, j->pg_delivered, j->acked_cursor,
        j->event_id);
    fo_log(FO_LOG_ERROR, "job stopped: its progress mark cannot be trusted",
           "job=%" PRId64 " event=%" PRId64 " error=\"%s\"", j->job_id, j->event_id, j->error);
    j->fatal = 1;
    j->state = FOD_JOB_FAILED;
    j->epoch++;
}

/* After NTF_EKEY: the key and the fix, as Redis's script said them. */
static void wait_for_key(fod_job_t *j)
{
    const char *why = j->io.key_refusal ? j->io.key_refusal(j->io.ctx) : NULL;
    go_wait(j, why && *why ? why : "a key fanout writes has the wrong type");
}

/* Adopt Redis's mark as the truth and carry on from it. */
static void page_arrived(fod_job_t *j, size_t n);

static void resume_from(fod_job_t *j, const ntf_progress_t *p)
{
    int early = j->early;
    reset_pipeline(j, p->cursor);
    j->acked_cursor = p->cursor;
    j->delivered = p->delivered;
    note_delivered(j, p->delivered);
    j->state = p->done ? FOD_JOB_DONE : FOD_JOB_RUNNING;
    /* a split only before anything is written: an earlier holder (one that stopped or died
     * before its outcome reached fanout.jobs) may have written pages the claim cannot see */
    if (p->cursor != j->range_lo || p->delivered != 0)
        j->split_candidate = 0;
    if (!early || p->done || p->cursor != j->range_lo)
        return; /* the early page, if any, is dropped */
    if (early == EARLY_HELD) {
        page_arrived(j, j->early_n);
    } else {
        j->early = EARLY_READING; /* its answer is this epoch's first page */
        j->early_epoch = j->epoch;
    }
}

/* --- writes --- */

/* A page or whole write answered: its time and, unless the answer is one the job handles
 * (moved, fenced, stopping, a refused key), a Redis error in the metrics. Returns the
 * seconds since it was sent (call is freed by call_done after). */
static double write_answered(fod_job_t *j, const job_call_t *call, int status)
{
    double s = seconds_since(call->sent_ns);
    if (j->io.metrics) {
        met_hist_observe(&j->io.metrics->redis_write, s);
        if (status != 0 && status != NTF_EMOVED && status != FO_EFENCED && status != FO_ESTOP &&
            status != NTF_EKEY)
            j->io.metrics->errors[MET_REDIS]++;
    }
    return s;
}

/* A write applied: Redis holds the job's entries up to p->cursor. */
static void write_applied(fod_job_t *j, const ntf_progress_t *p)
{
    j->acked_cursor = p->cursor;
    j->delivered = p->delivered;
    note_delivered(j, p->delivered);
    j->failures = 0;
    stop_waiting(j);
}

static void on_write(int status, const ntf_progress_t *p, void *data)
{
    job_call_t *call = data;
    fod_job_t *j = call->job;
    double ms = write_answered(j, call, status) * 1000.0;
    int current = call_done(data, &j);
    if (current && j->state != FOD_JOB_WAITING) {
        j->inflight--;
        switch (status) {
        case 0:
            fo_log(FO_LOG_DEBUG, "page written",
                   "job=%" PRId64 " cursor=%" PRId64 " delivered=%" PRId64
                   " done=%d inflight=%d ms=%.1f",
                   j->job_id, p->cursor, p->delivered, p->done, j->inflight, ms);
            write_applied(j, p);
            if (p->done)
                j->state = FOD_JOB_DONE;
            break;
        case NTF_EMOVED:
            fo_log(FO_LOG_INFO, "progress mark moved; resuming from it",
                   "job=%" PRId64 " cursor=%" PRId64 " delivered=%" PRId64, j->job_id, p->cursor,
                   p->delivered);
            if (j->state == FOD_JOB_RUNNING)
                resume_from(j, p);
            break;
        case FO_EFENCED:
            fo_log(FO_LOG_WARN, "job taken over by a newer lease; stopping it",
                   "job=%" PRId64 " token=%" PRId64, j->job_id, j->token);
            j->state = FOD_JOB_FENCED;
            j->epoch++;
            break;
        case FO_ESTOP:
            if (j->state != FOD_JOB_FAILED)
                j->state = FOD_JOB_DRAINING;
            j->epoch++;
            break;
        case NTF_ENOMARK:
            if (j->state == FOD_JOB_RUNNING)
                fail_mark(j, "is missing", NULL);
            else
                j->epoch++;
            break;
        case NTF_EKEY:
            if (j->state == FOD_JOB_RUNNING)
                wait_for_key(j);
            else
                j->epoch++;
            break;
        default:
            if (j->state == FOD_JOB_RUNNING)
                go_wait(j, status == NTF_EREPLICAS
                               ? "redis replicas did not acknowledge the page in time "
                                 "(FANOUT_REDIS_MIN_REPLICAS)"
                               : "redis write failed");
            else
                j->epoch++; /* draining: give up on the rest, the mark is exact anyway */
            break;
        }
    }
    pump(j);
    maybe_finish(j);
}

static void send_ready(fod_job_t *j)
{
    ntf_job_t view = ntf_view(j);
    job_call_t *c = call_new(j);
    int rc =
        j->io.write(j->io.ctx, &view, j->sent_cursor, j->page, j->ready_n, j->eof, on_write, c);
    if (rc < 0) {
        free(c);
        go_wait(j, "redis not ready");
        return;
    }
    j->outstanding++;
    j->inflight++;
    if (j->ready_n > 0)
        j->sent_cursor = j->page[j->ready_n - 1];
    j->ready = 0;
}

/* --- reads --- */

/* The buffer holds n ids of the current epoch to send. */
static void page_ready(fod_job_t *j, size_t n)
{
    j->ready = 1;
    j->ready_n = n;
    if (n > 0)
        j->read_cursor = j->page[n - 1];
    if (n < (size_t)j->page_size)
        j->eof = 1;
}

static void ask_split(fod_job_t *j, size_t n);

/* A page of the current epoch is in the buffer: first, for a fresh job whose first page is
 * full, the split question; then it is ready to send. */
static void page_arrived(fod_job_t *j, size_t n)
{
    if (j->split_candidate && n == (size_t)j->page_size && j->io.split)
        ask_split(j, n); /* the page waits in the buffer for the answer */
    else
        page_ready(j, n);
}

/* The split's answer. A committed split changes the range whatever the job does meanwhile
 * (a later fence must not read past the new end); an unknown outcome stops the job without a
 * record (it may have committed: the next claim of this worker's own lease gets the range
 * PostgreSQL holds). The first page, still in the buffer, keeps the ids within the range. */
static void on_split(int status, int64_t range_hi, void *data)
{
    job_call_t *call = data;
    size_t n = call->split_n;
    fod_job_t *j;
    int current = call_done(data, &j);
    j->reading = 0;
    if (status == 0) {
        j->range_hi = range_hi;
        j->split_asked = 0; /* the answer is known: split (the range says so) or not */
        if (current && j->state == FOD_JOB_RUNNING) {
            size_t keep = 0;
            while (keep < n && j->page[keep] <= range_hi)
                keep++;
            page_ready(j, keep);
            if (keep < n)
                j->eof = 1; /* the lowest ids of the whole list: all of this range */
        }
    } else if (status == FO_ESTOP) {
        if (!terminal(j->state))
            j->state = FOD_JOB_STOPPED;
        j->epoch++;
    } else if (!terminal(j->state)) {
        j->state = FOD_JOB_FENCED; /* left to the lease; nothing recorded */
        j->epoch++;
    }
    pump(j);
    maybe_finish(j);
}

/* Asks whether the job, whose full first page (n ids from its lowest follower) is in the
 * buffer, should be split before anything of it is written. Asked once. */
static void ask_split(fod_job_t *j, size_t n)
{
    j->split_candidate = 0;
    job_call_t *c = call_new(j);
    c->split_n = n;
    if (j->io.split(j->io.ctx, j->job_id, j->token, j->author, j->page[0], on_split, c) < 0) {
        free(c);
        page_ready(j, n); /* not asked: the job runs whole */
        return;
    }
    j->split_asked = 1;
    j->outstanding++;
    j->reading = 1; /* the buffer is taken until the answer */
}

/* The early first page answered: held until the fence answers, used at once if it did (and
 * the mark is at the range's start), dropped otherwise (a failed read is read again, by the
 * pipeline, once fenced). */
static void on_early_page(fod_job_t *j, int status, size_t n)
{
    if (j->whole == WHOLE_READING) {
        j->whole = WHOLE_NONE;
        if (j->state != FOD_JOB_FENCING || j->early != EARLY_READING) {
            j->early = EARLY_NONE; /* stopped or waiting meanwhile */
            return;
        }
        if (status == 0 && n < (size_t)j->page_size) {
            j->early = EARLY_NONE;
            j->early_n = n;
            j->whole = WHOLE_HELD; /* pump sends it */
            return;
        }
        /* a full page (or a failed read): the long way, the page held for the fence */
        j->early = status == 0 ? EARLY_HELD : EARLY_NONE;
        j->early_n = n;
        fence(j);
        return;
    }
    if (status == 0 && j->early == EARLY_READING && j->state == FOD_JOB_FENCING) {
        j->early = EARLY_HELD;
        j->early_n = n;
    } else if (status == 0 && j->early == EARLY_READING && j->state == FOD_JOB_RUNNING &&
               j->epoch == j->early_epoch) {
        j->early = EARLY_NONE;
        page_arrived(j, n);
    } else {
        j->early = EARLY_NONE;
    }
}

static void on_page(int status, const int64_t *ids, size_t n, const char *err, void *data)
{
    job_call_t *call = data;
    fod_job_t *j = call->job;
    double ms = seconds_since(call->sent_ns) * 1000.0; /* call is freed by call_done */
    met_t *m = j->io.metrics;
    if (m && status != FO_ESTOP) {
        if (status < 0) {
            m->errors[MET_PG]++;
        } else {
            m->pages_read++;
            m->rows_read += n;
        }
    }
    int early = call->early;
    int current = call_done(data, &j);
    j->reading = 0;
    if (early) {
        on_early_page(j, status, n);
    } else if (current && j->state == FOD_JOB_RUNNING) {
        if (status == FO_EQUERY) {
            /* the query itself is refused: this attempt fails once the writes in flight
             * are answered (their progress is kept); the daemon schedules the next one */
            j->error = fo_xstrdup(err ? err : "query failed");
            j->state = FOD_JOB_FAILED;
        } else if (status == FO_ECONTRACT) {
            /* not this event's fault: wait, attempt kept, until the contract holds again */
            go_wait(j, "the contract view changed");
            if (j->io.contract_broken)
                j->io.contract_broken(j->io.ctx, err);
        } else if (status < 0) {
            go_wait(j, "follower page read failed");
        } else {
            (void)ids; /* they are in j->page */
            fo_log(FO_LOG_DEBUG, "page read", "job=%" PRId64 " after=%" PRId64 " rows=%zu ms=%.1f",
                   j->job_id, j->read_cursor, n, ms);
            page_arrived(j, n);
        }
    }
    pump(j);
    maybe_finish(j);
}

/* The next read is the first page of an event's whole audience, which for most events is all
 * of it: the reader sends it on a first-page connection (rel_reader_fetch). A part of a split
 * event starts inside a long list, so its first page is a full one, read as the long
 * fan-out's pages are. */
static int first_page(const fod_job_t *j)
{
    return !fod_job_parted(j) && j->read_cursor == j->range_lo;
}

static void start_read(fod_job_t *j)
{
    job_call_t *c = call_new(j);
    int rc = j->io.fetch(j->io.ctx, j->author, j->read_cursor, j->range_hi, j->page_size,
                         first_page(j), j->page, on_page, c);
    if (rc < 0) {
        free(c);
        go_wait(j, "postgresql not ready");
        return;
    }
    j->outstanding++;
    j->reading = 1;
}

/* Moves the pipeline as far as it can: send the ready page, then read the next one. */
static void send_whole(fod_job_t *j);

static void pump(fod_job_t *j)
{
    if (j->state == FOD_JOB_FENCING && j->whole == WHOLE_HELD &&
        (!j->io.may_write || j->io.may_write(j->io.ctx)))
        send_whole(j);
    if (j->state != FOD_JOB_RUNNING)
        return;
    if (j->ready && j->inflight < j->cfg->window &&
        (!j->io.may_write || j->io.may_write(j->io.ctx)))
        send_ready(j);
    if (j->state == FOD_JOB_RUNNING && !j->reading && !j->ready && !j->eof)
        start_read(j);
}

/* A fence or a whole job's write (what) did not apply, for the reason status gives. */
static void not_applied(fod_job_t *j, int status, const char *what)
{
    char why[128];
    switch (status) {
    case FO_EFENCED:
        fo_log(FO_LOG_WARN, "job fenced: a newer lease holds it", "job=%" PRId64, j->job_id);
        j->state = FOD_JOB_FENCED;
        break;
    case FO_ESTOP:
        j->state = FOD_JOB_STOPPED;
        break;
    case NTF_ENOMARK:
        fail_mark(j, "is missing", NULL);
        break;
    case NTF_EKEY:
        wait_for_key(j);
        break;
    case NTF_EREPLICAS:
        snprintf(why, sizeof why,
                 "redis replicas did not acknowledge the %s in time (FANOUT_REDIS_MIN_REPLICAS)",
                 what);
        go_wait(j, why);
        break;
    default:
        snprintf(why, sizeof why, "redis %s failed", what);
        go_wait(j, why);
        break;
    }
}

/* --- a whole job --- */

static void on_whole(int status, const ntf_progress_t *p, void *data)
{
    job_call_t *call = data;
    fod_job_t *j = call->job;
    (void)write_answered(j, call, status);
    int current = call_done(data, &j);
    if (current && j->state == FOD_JOB_FENCING && j->whole == WHOLE_WRITING) {
        j->whole = WHOLE_NONE;
        switch (status) {
        case 0:
            /* what an earlier attempt wrote is not this process's work (note_delivered) */
            j->have_base = 1;
            j->counted = p->prior;
            write_applied(j, p);
            j->state = FOD_JOB_DONE;
            break;
        default:
            not_applied(j, status, "write"); /* outcome unknown: the fence will tell */
            break;
        }
    }
    pump(j);
    maybe_finish(j);
}

/* The job's every follower is in the buffer (early_n ids): fence, write and finish at once. A
 * range without followers is done without Redis: there is nothing to fence. */
static void send_whole(fod_job_t *j)
{
    size_t n = j->early_n;
    if (n == 0) {
        j->whole = WHOLE_NONE;
        j->have_base = 1;
        j->state = FOD_JOB_DONE;
        return;
    }
    ntf_job_t view = ntf_view(j);
    job_call_t *c = call_new(j);
    j->whole = WHOLE_WRITING;
    if (j->io.write_whole(j->io.ctx, &view, j->range_lo, j->page, n, on_whole, c) < 0) {
        free(c);
        go_wait(j, "redis not ready");
        return;
    }
    j->outstanding++;
}

/* --- fencing --- */

static void on_record_mark(int status, void *data)
{
    fod_job_t *j;
    int current = call_done(data, &j);
    if (current && j->state == FOD_JOB_FENCING) {
        if (status == 0) {
            j->pg_marked = 1;
            resume_from(j, &j->fenced);
        } else if (status == FO_ESTOP) {
            j->state = FOD_JOB_STOPPED;
        } else {
            go_wait(j, "postgresql did not record the progress mark");
        }
    }
    pump(j);
    maybe_finish(j);
}

/* The fence may just have created the mark: PostgreSQL learns it before the first page, so
 * that a later claim never creates it again over pages already written. Returns 1 if sent
 * (or the job now waits), 0 when there is nothing to record. */
static int record_mark(fod_job_t *j, const ntf_progress_t *p)
{
    if (j->pg_marked || !j->io.record_mark || p->done)
        return 0;
    j->fenced = *p;
    job_call_t *c = call_new(j);
    if (j->io.record_mark(j->io.ctx, j->job_id, j->token, on_record_mark, c) < 0) {
        free(c);
        go_wait(j, "postgresql not ready");
        return 1;
    }
    j->outstanding++;
    return 1;
}

static void on_fence(int status, const ntf_progress_t *p, void *data)
{
    fod_job_t *j;
    int current = call_done(data, &j);
    if (current && j->state == FOD_JOB_FENCING) {
        switch (status) {
        case 0:
            if (p->cursor < j->pg_progress || p->delivered < j->pg_delivered) {
                fail_mark(j, "is behind", p);
                break;
            }
            if (p->cursor != j->range_lo || p->delivered > 0)
                fo_log(FO_LOG_INFO, "job resumes from its progress mark",
                       "job=%" PRId64 " event=%" PRId64 " cursor=%" PRId64 " delivered=%" PRId64,
                       j->job_id, j->event_id, p->cursor, p->delivered);
            if (!record_mark(j, p))
                resume_from(j, p);
            break;
        default:
            not_applied(j, status, "fence");
            break;
        }
    }
    pump(j);
    maybe_finish(j);
}

static void fence(fod_job_t *j)
{
    ntf_job_t view = ntf_view(j);
    j->state = FOD_JOB_FENCING;
    job_call_t *c = call_new(j);
    if (j->io.fence(j->io.ctx, &view, j->range_lo, on_fence, c) < 0) {
        free(c);
        go_wait(j, "redis not ready");
        return;
    }
    j->outstanding++;
}

/* --- public --- */

fod_job_t *fod_job_new(const fod_job_io_t *io, const cfg_t *cfg, const fod_claim_t *claim)
{
    fod_job_t *j = fo_xcalloc(1, sizeof *j);
    j->io = *io;
    j->cfg = cfg;
    j->job_id = claim->job_id;
    j->event_id = claim->event_id;
    j->author = claim->author;
    j->token = claim->token;
    j->range_lo = claim->range_lo;
    j->range_hi = claim->range_hi;
    j->kind = fo_xstrdup(claim->kind);
    j->payload = fo_xstrdup(claim->payload);
    j->created_at = fo_xstrdup(claim->created_at);
    j->acked_cursor = j->read_cursor = j->sent_cursor = claim->range_lo;
    j->pg_progress = claim->pg_progress;
    j->pg_delivered = claim->pg_delivered;
    j->pg_marked = claim->pg_marked;
    j->split_candidate = claim->split_candidate;
    j->page_size = cfg->page_size;
    j->page = fo_xmalloc((size_t)j->page_size * sizeof *j->page);
    j->state = FOD_JOB_WAITING;
    return j;
}

void fod_job_free(fod_job_t *j)
{
    if (!j)
        return;
    free(j->kind);
    free(j->payload);
    free(j->created_at);
    free(j->page);
    free(j->error);
    free(j->waiting);
    free(j);
}

/* A fresh job's first page, read while it fences (see EARLY_*). */
static void read_early(fod_job_t *j)
{
    job_call_t *c = call_new(j);
    c->early = 1;
    if (j->io.fetch(j->io.ctx, j->author, j->range_lo, j->range_hi, j->page_size, first_page(j),
                    j->page, on_page, c) < 0) {
        free(c); /* read after the fence, as any page */
        return;
    }
    j->outstanding++;
    j->reading = 1;
    j->early = EARLY_READING;
}

void fod_job_start(fod_job_t *j, uint64_t now_ms)
{
    (void)now_ms;
    if (j->io.write_whole && !mark_required(j)) {
        /* nothing of its range can have been written the long way: read first, then decide */
        j->state = FOD_JOB_FENCING;
        read_early(j);
        if (j->early == EARLY_READING) {
            j->whole = WHOLE_READING;
            return;
        }
    }
    fence(j);
    if (j->state == FOD_JOB_FENCING && !mark_required(j))
        read_early(j);
    maybe_finish(j);
}

void fod_job_kick(fod_job_t *j, uint64_t now_ms, int force)
{
    if (j->state != FOD_JOB_WAITING || (!force && now_ms < j->retry_at))
        return;
    if (j->reading) {
        /* a read of a forgotten epoch still fills the buffer: wait for it */
        return;
    }
    fence(j);
    maybe_finish(j);
}

void fod_job_pump(fod_job_t *j)
{
    pump(j);
}

void fod_job_stop(fod_job_t *j)
{
    if (terminal(j->state) || j->state == FOD_JOB_DRAINING)
        return;
    if (j->state == FOD_JOB_WAITING || j->state == FOD_JOB_FENCING)
        j->epoch++; /* nothing of this epoch needs its answer any more */
    j->state = FOD_JOB_DRAINING;
    maybe_finish(j);
}

fod_job_state_t fod_job_state(const fod_job_t *j)
{
    return j->state;
}

const char *fod_job_state_name(fod_job_state_t s)
{
    return state_names[s];
}

int64_t fod_job_id(const fod_job_t *j)
{
    return j->job_id;
}

int64_t fod_job_event_id(const fod_job_t *j)
{
    return j->event_id;
}

int fod_job_parted(const fod_job_t *j)
{
    return j->range_lo != 0 || j->range_hi != INT64_MAX || j->split_asked;
}

int64_t fod_job_token(const fod_job_t *j)
{
    return j->token;
}

int64_t fod_job_cursor(const fod_job_t *j)
{
    return j->acked_cursor;
}

int64_t fod_job_delivered(const fod_job_t *j)
{
    return j->delivered;
}

int fod_job_streaming(const fod_job_t *j)
{
    return !terminal(j->state) && j->delivered >= j->page_size;
}

const char *fod_job_error(const fod_job_t *j)
{
    return j->error;
}

int fod_job_fatal(const fod_job_t *j)
{
    return j->fatal;
}

const char *fod_job_waiting(const fod_job_t *j)
{
    return terminal(j->state) ? NULL : j->waiting;
}

uint64_t fod_job_retry_at(const fod_job_t *j)
{
    return j->retry_at;
}
