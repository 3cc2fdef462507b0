/*
 * test_job.c: the job state machine against fake PostgreSQL and Redis.
 *
 * The fakes record every call with its arguments and callback; each test answers them in the
 * order and with the outcomes it wants (success, lost connection, fenced, moved mark), then
 * checks what the job asked for next and how it finished.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fanout/fod_int.h"

#define MAXCALLS 64

typedef enum { C_FETCH, C_FENCE, C_WRITE, C_WHOLE } call_kind_t;

typedef struct call {
    call_kind_t kind;
    int64_t after, upto, expect, start;
    int limit, last;
    int first;         /* C_FETCH: flagged as the first page of the job's range */
    int mark_required; /* C_FENCE: what the job asked for */
    size_t n;
    int64_t ids[16];
    int64_t *out;
    rel_page_cb page_cb;
    ntf_progress_cb prog_cb;
    void *data;
    int answered;
} call_t;

typedef struct fake {
    call_t calls[MAXCALLS];
    int ncalls;
    int finished;
    fod_job_state_t final_state;
    int64_t final_cursor, final_delivered;
    int refuse_redis; /* io returns FO_EREDIS as if the client were not ready */
    /* the simulated follower list and Redis mark */
    int64_t followers[64];
    int nfollowers;
    int64_t range_lo; /* of the job started last */
} fake_t;

static fake_t F;
static cfg_t cfg;

static int fake_fetch(void *ctx, int64_t author, int64_t after, int64_t upto, int limit, int first,
                      int64_t *out, rel_page_cb cb, void *data)
{
    call_t *c = &F.calls[F.ncalls++];
    *c = (call_t){.kind = C_FETCH,
                  .first = first,
                  .after = after,
                  .upto = upto,
                  .limit = limit,
                  .out = out,
                  .page_cb = cb,
                  .data = data};
    return 0;
}

static int fake_fence(void *ctx, const ntf_job_t *job, int64_t start, ntf_progress_cb cb,
                      void *data)
{
    if (F.refuse_redis)
        return FO_EREDIS;
    call_t *c = &F.calls[F.ncalls++];
    *c = (call_t){.kind = C_FENCE,
                  .start = start,
                  .mark_required = job->mark_required,
                  .prog_cb = cb,
                  .data = data};
    return 0;
}

static int fake_write(void *ctx, const ntf_job_t *job, int64_t expect, const int64_t *ids, size_t n,
                      int last, ntf_progress_cb cb, void *data)
{
    if (F.refuse_redis)
        return FO_EREDIS;
    call_t *c = &F.calls[F.ncalls++];
    *c = (call_t){
        .kind = C_WRITE, .expect = expect, .n = n, .last = last, .prog_cb = cb, .data = data};
    assert_true(n <= 16);
    memcpy(c->ids, ids, n * sizeof *ids);
    return 0;
}

static int fake_whole(void *ctx, const ntf_job_t *job, int64_t start, const int64_t *ids, size_t n,
                      ntf_progress_cb cb, void *data)
{
    if (F.refuse_redis)
        return FO_EREDIS;
    call_t *c = &F.calls[F.ncalls++];
    *c = (call_t){.kind = C_WHOLE, .start = start, .n = n, .prog_cb = cb, .data = data};
    assert_true(n <= 16);
    memcpy(c->ids, ids, n * sizeof *ids);
    return 0;
}

static void fake_finished(void *ctx, fod_job_t *j)
{
    F.finished++;
    F.final_state = fod_job_state(j);
    F.final_cursor = fod_job_cursor(j);
    F.final_delivered = fod_job_delivered(j);
}

static int paused;
static int fake_may_write(void *ctx)
{
    return !paused;
}

static char contract_err[128];
static int contract_calls;
static void fake_contract_broken(void *ctx, const char *err)
{
    contract_calls++;
    snprintf(contract_err, sizeof contract_err, "%s", err ? err : "");
}

static const char *fake_key_refusal(void *ctx)
{
    return "WRONGTYPE fanout: key fo:stream:3 is a string, not a stream";
}

static const fod_job_io_t io = {.fetch = fake_fetch,
                                .fence = fake_fence,
                                .write = fake_write,
                                .finished = fake_finished,
                                .may_write = fake_may_write,
                                .contract_broken = fake_contract_broken,
                                .key_refusal = fake_key_refusal};

/* record_mark for the tests that check it: the call is kept for answer_record. */
static void (*record_cb)(int status, void *data);
static void *record_data;
static int records;
static int fake_record_mark(void *ctx, int64_t job_id, int64_t token,
                            void (*cb)(int status, void *data), void *data)
{
    records++;
    record_cb = cb;
    record_data = data;
    return 0;
}

static const fod_job_io_t io_rec = {.fetch = fake_fetch,
                                    .fence = fake_fence,
                                    .write = fake_write,
                                    .finished = fake_finished,
                                    .may_write = fake_may_write,
                                    .contract_broken = fake_contract_broken,
                                    .key_refusal = fake_key_refusal,
                                    .record_mark = fake_record_mark};

/* split for the tests that check it: the question is kept for answer_split. */
static fod_split_cb split_cb;
static void *split_data;
static int splits;
static int64_t split_lo;
static int fake_split(void *ctx, int64_t job_id, int64_t token, int64_t author, int64_t lo,
                      fod_split_cb cb, void *data)
{
    splits++;
    split_lo = lo;
    split_cb = cb;
    split_data = data;
    return 0;
}

static const fod_job_io_t io_split = {.fetch = fake_fetch,
                                      .fence = fake_fence,
                                      .write = fake_write,
                                      .finished = fake_finished,
                                      .may_write = fake_may_write,
                                      .split = fake_split};

/* The oldest unanswered call of a kind. */
static call_t *next_call(call_kind_t kind)
{
    for (int i = 0; i < F.ncalls; i++)
        if (!F.calls[i].answered && F.calls[i].kind == kind)
            return &F.calls[i];
    return NULL;
}

static int pending(call_kind_t kind)
{
    int n = 0;
    for (int i = 0; i < F.ncalls; i++)
        n += !F.calls[i].answered && F.calls[i].kind == kind;
    return n;
}

/* Answers the oldest fetch from the simulated follower list. */
static void answer_fetch(void)
{
    call_t *c = next_call(C_FETCH);
    assert_non_null(c);
    c->answered = 1;
    /* a first page: from the start of an unsplit job's range (start_claimed's are unsplit
     * when they start at 0) */
    assert_int_equal(c->first, c->after == 0 && F.range_lo == 0);
    size_t n = 0;
    for (int i = 0; i < F.nfollowers && n < (size_t)c->limit; i++)
        if (F.followers[i] > c->after && F.followers[i] <= c->upto)
            c->out[n++] = F.followers[i];
    c->page_cb(0, c->out, n, NULL, c->data);
}

static void answer_fetch_error(void)
{
    call_t *c = next_call(C_FETCH);
    assert_non_null(c);
    c->answered = 1;
    c->page_cb(FO_EPG, c->out, 0, NULL, c->data);
}

static void answer_fetch_refused(const char *why)
{
    call_t *c = next_call(C_FETCH);
    assert_non_null(c);
    c->answered = 1;
    c->page_cb(FO_EQUERY, c->out, 0, why, c->data);
}

static void answer_progress(call_kind_t kind, int status, int64_t cursor, int64_t delivered,
                            int done)
{
    call_t *c = next_call(kind);
    assert_non_null(c);
    c->answered = 1;
    ntf_progress_t p = {.cursor = cursor, .delivered = delivered, .done = done};
    c->prog_cb(status, (status == 0 || status == NTF_EMOVED) ? &p : NULL, c->data);
}

/* Answers the oldest write as Redis would: applied, with the mark after it. */
static int64_t redis_delivered;
static void apply_write(void)
{
    call_t *c = next_call(C_WRITE);
    assert_non_null(c);
    redis_delivered += (int64_t)c->n;
    answer_progress(C_WRITE, 0, c->n ? c->ids[c->n - 1] : c->expect, redis_delivered, c->last);
}

/* A fresh job reads its first page while it fences; the tests of what follows the fence
 * fail that read (it is dropped, and read again once fenced). */
static void drop_early_read(void)
{
    if (pending(C_FETCH))
        answer_fetch_error();
}

static void set_followers(int n)
{
    F.nfollowers = n;
    for (int i = 0; i < n; i++)
        F.followers[i] = (i + 1) * 10;
}

static fod_job_t *start_claimed(int64_t range_lo, int64_t pg_progress, int64_t pg_delivered)
{
    fod_claim_t claim = {.job_id = 7,
                         .event_id = 70,
                         .author = 5,
                         .token = 2,
                         .range_lo = range_lo,
                         .range_hi = INT64_MAX,
                         .pg_progress = pg_progress,
                         .pg_delivered = pg_delivered,
                         .kind = "post",
                         .payload = "{}",
                         .created_at = "2026-11-27T00:00:00.000000Z"};
    F.range_lo = range_lo;
    fod_job_t *j = fod_job_new(&io, &cfg, &claim);
    fod_job_start(j, 0);
    drop_early_read();
    return j;
}

static fod_job_t *start_job(int64_t range_lo)
{
    return start_claimed(range_lo, 0, 0);
}

static int setup(void **state)
{
    memset(&F, 0, sizeof F);
    contract_calls = 0;
    contract_err[0] = '\0';
    paused = 0;
    redis_delivered = 0;
    memset(&cfg, 0, sizeof cfg);
    cfg.page_size = 3;
    cfg.window = 2;
    cfg.reconnect_max_ms = 1000;
    return 0;
}

/* Runs the job to completion answering everything successfully. */
static void run_to_end(void)
{
    for (int guard = 0; guard < 100 && !F.finished; guard++) {
        if (pending(C_FETCH))
            answer_fetch();
        else if (pending(C_WRITE))
            apply_write();
        else
            break;
    }
}

static void test_no_followers_finishes_with_empty_last_page(void **state)
{
    fod_job_t *j = start_job(0);
    assert_int_equal(fod_job_state(j), FOD_JOB_FENCING);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    call_t *w = next_call(C_WRITE);
    assert_non_null(w);
    assert_int_equal(w->n, 0);
    assert_int_equal(w->last, 1);
    apply_write();
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 0);
    fod_job_free(j);
}

static void test_pages_are_pipelined_in_order(void **state)
{
    set_followers(7);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch(); /* page 10,20,30 -> sent, next read starts */
    assert_int_equal(pending(C_WRITE), 1);
    assert_int_equal(pending(C_FETCH), 1);
    answer_fetch(); /* page 40,50,60 -> sent (window 2) */
    assert_int_equal(pending(C_WRITE), 2);
    answer_fetch(); /* page 70 (short: last) -> waits for the window */
    assert_int_equal(pending(C_WRITE), 2);
    assert_int_equal(pending(C_FETCH), 0);
    call_t *w1 = next_call(C_WRITE);
    assert_int_equal(w1->expect, 0);
    assert_int_equal(w1->ids[2], 30);
    apply_write();
    call_t *w3 = &F.calls[F.ncalls - 1];
    assert_int_equal(w3->kind, C_WRITE);
    assert_int_equal(w3->expect, 60);
    assert_int_equal(w3->n, 1);
    assert_int_equal(w3->last, 1);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 7);
    assert_int_equal(F.final_cursor, 70);
    fod_job_free(j);
}

static void test_full_last_page_is_followed_by_empty_finish(void **state)
{
    set_followers(6);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    run_to_end();
    call_t *last = &F.calls[F.ncalls - 1];
    assert_int_equal(last->kind, C_WRITE);
    assert_int_equal(last->n, 0);
    assert_int_equal(last->expect, 60);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 6);
    fod_job_free(j);
}

static void test_resumes_after_the_progress_mark(void **state)
{
    set_followers(7);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 40, 4, 0); /* a previous worker wrote 4 */
    redis_delivered = 4;
    call_t *f = next_call(C_FETCH);
    assert_int_equal(f->after, 40);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 7);
    fod_job_free(j);
}

static void test_done_mark_finishes_without_writing(void **state)
{
    set_followers(7);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 70, 7, 1);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(pending(C_FETCH) + pending(C_WRITE), 0);
    fod_job_free(j);
}

static void test_lost_redis_refences_and_resumes_from_redis(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    answer_fetch(); /* two writes in flight */
    apply_write();  /* first applied: mark at 30 */
    /* the connection drops: the second write's outcome is unknown */
    answer_progress(C_WRITE, FO_EREDIS, 0, 0, 0);
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    assert_int_equal(F.finished, 0);
    /* a read of the forgotten pipeline may still be in flight: it changes nothing */
    if (pending(C_FETCH))
        answer_fetch();
    int writes_before = pending(C_WRITE);
    assert_int_equal(writes_before, 0);
    fod_job_kick(j, fod_job_retry_at(j), 0);
    assert_int_equal(fod_job_state(j), FOD_JOB_FENCING);
    /* Redis had in fact applied the second page: the mark is at 60 */
    redis_delivered = 6;
    answer_progress(C_FENCE, 0, 60, 6, 0);
    call_t *f = next_call(C_FETCH);
    assert_non_null(f);
    assert_int_equal(f->after, 60);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 9);
    fod_job_free(j);
}

static void test_redis_not_ready_waits_then_retries(void **state)
{
    F.refuse_redis = 1;
    fod_job_t *j = start_job(0);
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    fod_job_kick(j, 0, 0); /* not due yet */
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    F.refuse_redis = 0;
    fod_job_kick(j, 0, 1); /* forced: Redis came back */
    assert_int_equal(fod_job_state(j), FOD_JOB_FENCING);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    fod_job_free(j);
}

static void test_moved_mark_resumes_from_it(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    answer_fetch();
    /* Redis says the mark is elsewhere (e.g. 60 after an earlier lost reply) */
    redis_delivered = 6;
    answer_progress(C_WRITE, NTF_EMOVED, 60, 6, 0);
    /* the second write of the forgotten pipeline is answered as moved too: ignored */
    answer_progress(C_WRITE, NTF_EMOVED, 60, 6, 0);
    if (pending(C_FETCH)) {
        call_t *f = next_call(C_FETCH);
        if (f->after != 60)
            answer_fetch(); /* stale read */
    }
    call_t *f = next_call(C_FETCH);
    assert_non_null(f);
    assert_int_equal(f->after, 60);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 9);
    fod_job_free(j);
}

static void test_fenced_job_stops_writing(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    answer_fetch();
    answer_progress(C_WRITE, FO_EFENCED, 0, 0, 0);
    int calls = F.ncalls;
    answer_progress(C_WRITE, FO_EFENCED, 0, 0, 0);
    while (pending(C_FETCH))
        answer_fetch();
    assert_int_equal(pending(C_WRITE), 0);
    assert_int_equal(F.ncalls, calls); /* nothing new was sent */
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FENCED);
    fod_job_free(j);
}

static void test_fenced_at_start(void **state)
{
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, FO_EFENCED, 0, 0, 0);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FENCED);
    fod_job_free(j);
}

static void test_stop_drains_the_writes_in_flight(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    answer_fetch();
    fod_job_stop(j);
    assert_int_equal(fod_job_state(j), FOD_JOB_DRAINING);
    int calls = F.ncalls;
    apply_write();
    apply_write();
    if (pending(C_FETCH))
        answer_fetch();
    assert_int_equal(F.ncalls, calls);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_STOPPED);
    assert_int_equal(F.final_cursor, 60);
    assert_int_equal(F.final_delivered, 6);
    fod_job_free(j);
}

static void test_read_failure_waits_and_rereads(void **state)
{
    set_followers(4);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch_error();
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    fod_job_kick(j, fod_job_retry_at(j), 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 4);
    fod_job_free(j);
}

static void test_refused_query_fails_after_the_writes_in_flight(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch(); /* page 1 sent, page 2 read in flight */
    answer_fetch_refused("division by zero");
    assert_int_equal(F.finished, 0); /* page 1 is still unanswered */
    int calls = F.ncalls;
    apply_write();
    assert_int_equal(F.ncalls, calls); /* nothing new after the failure */
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FAILED);
    assert_int_equal(F.final_cursor, 30); /* the progress made is kept */
    assert_string_equal(fod_job_error(j), "division by zero");
    fod_job_free(j);
}

/* A page refused because the view changed is not the event's fault: the job tells the
 * daemon (which pauses and checks the contract) and waits, its attempt kept, then resumes
 * from Redis's mark exactly where it stopped. */
static void test_contract_error_waits_without_failing(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch(); /* page 1 sent, page 2 read in flight */
    call_t *c = next_call(C_FETCH);
    assert_non_null(c);
    c->answered = 1;
    c->page_cb(FO_ECONTRACT, c->out, 0, "column \"follower\" does not exist", c->data);
    assert_int_equal(contract_calls, 1);
    assert_string_equal(contract_err, "column \"follower\" does not exist");
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    apply_write(); /* page 1's answer arrives late: ignored, Redis holds it anyway */
    assert_int_equal(F.finished, 0);
    fod_job_kick(j, 0, 1); /* the contract holds again */
    answer_progress(C_FENCE, 0, 30, 3, 0);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 9);
    assert_null(fod_job_error(j));
    fod_job_free(j);
}

static void test_backpressure_holds_writes_until_pumped(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    paused = 1;
    answer_fetch(); /* read, but may not be written */
    assert_int_equal(pending(C_WRITE), 0);
    assert_int_equal(pending(C_FETCH), 0); /* and no further read: the buffer is full */
    fod_job_pump(j);
    assert_int_equal(pending(C_WRITE), 0);
    paused = 0;
    fod_job_pump(j);
    assert_int_equal(pending(C_WRITE), 1);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 9);
    fod_job_free(j);
}

static void test_range_bounds_are_passed_to_reads(void **state)
{
    set_followers(9);
    fod_claim_t claim = {.job_id = 1,
                         .event_id = 1,
                         .author = 5,
                         .token = 1,
                         .range_lo = 20,
                         .range_hi = 50,
                         .kind = "k",
                         .payload = "{}",
                         .created_at = "t"};
    F.range_lo = 20;
    fod_job_t *j = fod_job_new(&io, &cfg, &claim);
    fod_job_start(j, 0);
    call_t *fe = next_call(C_FENCE);
    assert_int_equal(fe->start, 20);
    answer_progress(C_FENCE, 0, 20, 0, 0);
    assert_int_equal(next_call(C_FETCH)->upto, 50);
    run_to_end();
    assert_int_equal(F.final_delivered, 3); /* 30, 40, 50 */
    fod_job_free(j);
}

/* A fresh job may create its mark; once PostgreSQL recorded a page, it must exist. */
static void test_mark_required_after_progress(void **state)
{
    set_followers(9);
    fod_job_t *j = start_claimed(0, 0, 0);
    assert_int_equal(next_call(C_FENCE)->mark_required, 0);
    answer_progress(C_FENCE, FO_ESTOP, 0, 0, 0); /* nothing left in flight to free */
    assert_int_equal(F.final_state, FOD_JOB_STOPPED);
    fod_job_free(j);
    memset(&F, 0, sizeof F);
    j = start_claimed(0, 30, 3);
    assert_int_equal(next_call(C_FENCE)->mark_required, 1);
    answer_progress(C_FENCE, NTF_ENOMARK, 0, 0, 0);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FAILED);
    assert_true(fod_job_fatal(j));
    assert_non_null(strstr(fod_job_error(j), "missing"));
    assert_non_null(strstr(fod_job_error(j), "fanoutctl retry 70"));
    assert_int_equal(pending(C_FETCH) + pending(C_WRITE), 0);
    fod_job_free(j);
}

/* A mark behind PostgreSQL's checkpoint (a failover lost pages): stop, never rewrite. */
static void test_mark_behind_postgres_stops(void **state)
{
    set_followers(9);
    fod_job_t *j = start_claimed(0, 60, 6);
    answer_progress(C_FENCE, 0, 30, 3, 0);
    assert_int_equal(F.final_state, FOD_JOB_FAILED);
    assert_true(fod_job_fatal(j));
    assert_non_null(strstr(fod_job_error(j), "behind"));
    assert_int_equal(pending(C_FETCH) + pending(C_WRITE), 0);
    fod_job_free(j);
}

/* A mark deleted mid fan-out: the page finds none, the job stops; it never re-creates it. */
static void test_mark_lost_mid_fanout_stops(void **state)
{
    set_followers(9);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    apply_write();
    answer_fetch();
    answer_progress(C_WRITE, NTF_ENOMARK, 0, 0, 0);
    if (pending(C_FETCH))
        answer_fetch();
    while (pending(C_WRITE))
        answer_progress(C_WRITE, NTF_ENOMARK, 0, 0, 0);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FAILED);
    assert_int_equal(F.final_cursor, 30);
    assert_true(fod_job_fatal(j));
    fod_job_free(j);
}

/* A wrong-typed key: the job waits with the key in its reason, then resumes from the mark. */
static void test_wrong_typed_key_waits_then_resumes(void **state)
{
    set_followers(4);
    fod_job_t *j = start_job(0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    answer_progress(C_WRITE, NTF_EKEY, 0, 0, 0);
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    assert_non_null(strstr(fod_job_waiting(j), "fo:stream:3"));
    if (pending(C_FETCH))
        answer_fetch();
    fod_job_kick(j, fod_job_retry_at(j), 0);
    assert_int_equal(next_call(C_FENCE)->mark_required, 1);
    answer_progress(C_FENCE, NTF_EKEY, 0, 0, 0); /* still wrong */
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    fod_job_kick(j, fod_job_retry_at(j), 0);
    answer_progress(C_FENCE, 0, 0, 0, 0); /* a fence works either way: still waiting */
    assert_non_null(fod_job_waiting(j));
    answer_fetch();
    apply_write(); /* fixed: the page applies */
    assert_null(fod_job_waiting(j));
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 4);
    assert_false(fod_job_fatal(j));
    fod_job_free(j);
}

/* A fresh job tells PostgreSQL its mark exists before its first page; a claim that says
 * so fences with mark_required and records nothing again. */
static void test_mark_is_recorded_before_the_first_page(void **state)
{
    set_followers(4);
    records = 0;
    fod_claim_t claim = {.job_id = 7,
                         .event_id = 70,
                         .author = 5,
                         .token = 1,
                         .range_hi = INT64_MAX,
                         .kind = "post",
                         .payload = "{}",
                         .created_at = "t"};
    fod_job_t *j = fod_job_new(&io_rec, &cfg, &claim);
    fod_job_start(j, 0);
    drop_early_read();
    assert_int_equal(next_call(C_FENCE)->mark_required, 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    assert_int_equal(records, 1);
    assert_int_equal(pending(C_FETCH) + pending(C_WRITE), 0); /* nothing before the record */
    assert_int_equal(fod_job_state(j), FOD_JOB_FENCING);
    record_cb(FO_EPG, record_data); /* not written: wait, fence again, record again */
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    fod_job_kick(j, fod_job_retry_at(j), 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    assert_int_equal(records, 2);
    record_cb(0, record_data);
    assert_int_equal(fod_job_state(j), FOD_JOB_RUNNING);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 4);
    fod_job_free(j);

    memset(&F, 0, sizeof F);
    claim.pg_marked = 1;
    claim.token = 2;
    j = fod_job_new(&io_rec, &cfg, &claim);
    fod_job_start(j, 0);
    assert_int_equal(next_call(C_FENCE)->mark_required, 1);
    answer_progress(C_FENCE, FO_ESTOP, 0, 0, 0);
    assert_int_equal(records, 2);
    fod_job_free(j);
}

/* A fresh start of the fake servers with n followers, and the claim started on io. */
static fod_job_t *restart(const fod_job_io_t *via, const fod_claim_t *claim, int n,
                          int64_t delivered)
{
    memset(&F, 0, sizeof F);
    redis_delivered = delivered;
    set_followers(n);
    fod_job_t *j = fod_job_new(via, &cfg, claim);
    fod_job_start(j, 0);
    return j;
}

/* A fresh job asks whether to split only when its first page comes back full, before
 * writing it; the answer's range end cuts the page, and the range is the job's from then on.
 * A job whose audience fits in one page never asks. */
static void test_full_first_page_asks_to_split_before_writing(void **state)
{
    fod_claim_t claim = {.job_id = 1,
                         .event_id = 1,
                         .author = 5,
                         .token = 1,
                         .range_lo = 0,
                         .range_hi = INT64_MAX,
                         .split_candidate = 1,
                         .kind = "k",
                         .payload = "{}",
                         .created_at = "t"};
    set_followers(2); /* one page, not full: no question */
    splits = 0;
    fod_job_t *j = fod_job_new(&io_split, &cfg, &claim);
    fod_job_start(j, 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    run_to_end();
    assert_int_equal(splits, 0);
    assert_int_equal(F.final_delivered, 2);
    fod_job_free(j);

    j = restart(&io_split, &claim, 9, 0); /* 10 .. 90: the first page (10, 20, 30) is full */
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    assert_int_equal(splits, 1);
    assert_int_equal(split_lo, 10);
    assert_int_equal(pending(C_WRITE), 0); /* nothing written before the answer */
    assert_int_equal(pending(C_FETCH), 0);
    split_cb(0, 25, split_data); /* this job keeps (0, 25] */
    call_t *w = next_call(C_WRITE);
    assert_non_null(w);
    assert_int_equal(w->n, 2); /* 10, 20: 30 is another range's */
    assert_int_equal(w->last, 1);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 2);
    fod_job_free(j);

    /* the split's outcome unknown: the job stops, writes nothing and records nothing */
    j = restart(&io_split, &claim, 9, 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    answer_fetch();
    assert_int_equal(splits, 2);
    split_cb(FO_EPG, 0, split_data);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_FENCED);
    assert_int_equal(pending(C_WRITE), 0);
    fod_job_free(j);
}

/* A fresh job's first page is read while the fence is out, and written only once the
 * fence and the mark's record answered with the mark at the range's start; a mark found
 * elsewhere drops it. */
static void test_fresh_job_reads_its_first_page_while_fencing(void **state)
{
    set_followers(2);
    fod_claim_t claim = {.job_id = 1,
                         .event_id = 1,
                         .author = 5,
                         .token = 1,
                         .range_lo = 0,
                         .range_hi = INT64_MAX,
                         .kind = "k",
                         .payload = "{}",
                         .created_at = "t"};
    records = 0;
    fod_job_t *j = fod_job_new(&io_rec, &cfg, &claim);
    fod_job_start(j, 0);
    assert_int_equal(pending(C_FENCE), 1);
    assert_int_equal(pending(C_FETCH), 1); /* at once, beside the fence */
    answer_fetch();
    assert_int_equal(pending(C_WRITE), 0); /* held: not fenced yet */
    answer_progress(C_FENCE, 0, 0, 0, 0);
    assert_int_equal(records, 1);
    assert_int_equal(pending(C_WRITE), 0); /* held: the mark is not recorded yet */
    record_cb(0, record_data);
    assert_int_equal(pending(C_WRITE), 1);
    assert_int_equal(pending(C_FETCH), 0); /* two ids: the one page */
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 2);
    fod_job_free(j);

    /* the fence answers first; the page is sent when it arrives */
    j = restart(&io, &claim, 2, 0);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    assert_int_equal(pending(C_FETCH), 1); /* still the early one */
    answer_fetch();
    assert_int_equal(pending(C_WRITE), 1);
    run_to_end();
    assert_int_equal(F.final_delivered, 2);
    fod_job_free(j);

    /* a mark elsewhere (an earlier holder's, against what PostgreSQL knows): dropped */
    j = restart(&io, &claim, 3, 1);
    answer_fetch();
    answer_progress(C_FENCE, 0, 10, 1, 0);
    assert_int_equal(pending(C_WRITE), 0);
    assert_int_equal(next_call(C_FETCH)->after, 10);
    run_to_end();
    assert_int_equal(F.final_delivered, 3);
    fod_job_free(j);
}

/* A fresh claim (nothing recorded in PostgreSQL) started with write_whole, with n
 * followers, its first page read answered. */
static fod_job_t *start_whole(int n, int64_t pg_progress)
{
    static fod_job_io_t iow;
    iow = io_rec;
    iow.write_whole = fake_whole;
    fod_claim_t claim = {.job_id = 1,
                         .event_id = 1,
                         .author = 5,
                         .token = 1,
                         .range_lo = 0,
                         .range_hi = INT64_MAX,
                         .pg_progress = pg_progress,
                         .kind = "k",
                         .payload = "{}",
                         .created_at = "t"};
    memset(&F, 0, sizeof F);
    records = 0;
    set_followers(n);
    fod_job_t *j = fod_job_new(&iow, &cfg, &claim);
    fod_job_start(j, 0);
    if (pg_progress == 0) {
        assert_int_equal(pending(C_FENCE), 0); /* it reads before anything else */
        answer_fetch();
    }
    return j;
}

/* A fresh job with write_whole reads first: a short page is written whole (no fence, no
 * mark record); a full one goes the long way, the page held for the fence; a whole write
 * whose outcome is unknown retries the long way. */
static void test_fresh_short_job_is_written_whole(void **state)
{
    fod_job_t *j = start_whole(2, 0);
    call_t *c = next_call(C_WHOLE);
    assert_non_null(c);
    assert_int_equal(c->n, 2);
    assert_true(c->ids[0] == 10 && c->ids[1] == 20 && c->start == 0);
    c->answered = 1;
    ntf_progress_t p = {.cursor = 20, .delivered = 3, .done = 1, .prior = 1};
    c->prog_cb(0, &p, c->data);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 3);
    assert_int_equal(records, 0);
    assert_int_equal(pending(C_FENCE), 0);
    fod_job_free(j);

    /* no followers: done without Redis */
    j = start_whole(0, 0);
    assert_int_equal(F.finished, 1);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.ncalls, 1);
    fod_job_free(j);

    /* a full first page: fence, mark record, then the held page */
    j = start_whole(5, 0);
    assert_int_equal(pending(C_WHOLE), 0);
    assert_int_equal(pending(C_FENCE), 1);
    answer_progress(C_FENCE, 0, 0, 0, 0);
    record_cb(0, record_data);
    assert_int_equal(pending(C_WRITE), 1);
    assert_int_equal(next_call(C_WRITE)->n, 3);
    run_to_end();
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 5);
    fod_job_free(j);

    /* a lost reply: waits, then fences (the long way), which finds the job done */
    j = start_whole(2, 0);
    answer_progress(C_WHOLE, FO_EREDIS, 0, 0, 0);
    assert_int_equal(fod_job_state(j), FOD_JOB_WAITING);
    fod_job_kick(j, 0, 1);
    assert_int_equal(pending(C_FENCE), 1);
    assert_int_equal(pending(C_WHOLE), 0);
    answer_progress(C_FENCE, 0, 20, 2, 1);
    assert_int_equal(F.final_state, FOD_JOB_DONE);
    assert_int_equal(F.final_delivered, 2);
    fod_job_free(j);

    /* fenced: stops */
    j = start_whole(2, 0);
    answer_progress(C_WHOLE, FO_EFENCED, 0, 0, 0);
    assert_int_equal(F.final_state, FOD_JOB_FENCED);
    fod_job_free(j);

    /* a job PostgreSQL holds progress for never goes this way */
    j = start_whole(2, 10);
    assert_int_equal(pending(C_FENCE), 1);
    answer_progress(C_FENCE, FO_ESTOP, 0, 0, 0);
    fod_job_free(j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_no_followers_finishes_with_empty_last_page, setup),
        cmocka_unit_test_setup(test_pages_are_pipelined_in_order, setup),
        cmocka_unit_test_setup(test_full_last_page_is_followed_by_empty_finish, setup),
        cmocka_unit_test_setup(test_resumes_after_the_progress_mark, setup),
        cmocka_unit_test_setup(test_done_mark_finishes_without_writing, setup),
        cmocka_unit_test_setup(test_lost_redis_refences_and_resumes_from_redis, setup),
        cmocka_unit_test_setup(test_redis_not_ready_waits_then_retries, setup),
        cmocka_unit_test_setup(test_moved_mark_resumes_from_it, setup),
        cmocka_unit_test_setup(test_fenced_job_stops_writing, setup),
        cmocka_unit_test_setup(test_fenced_at_start, setup),
        cmocka_unit_test_setup(test_stop_drains_the_writes_in_flight, setup),
        cmocka_unit_test_setup(test_read_failure_waits_and_rereads, setup),
        cmocka_unit_test_setup(test_refused_query_fails_after_the_writes_in_flight, setup),
        cmocka_unit_test_setup(test_contract_error_waits_without_failing, setup),
        cmocka_unit_test_setup(test_backpressure_holds_writes_until_pumped, setup),
        cmocka_unit_test_setup(test_range_bounds_are_passed_to_reads, setup),
        cmocka_unit_test_setup(test_full_first_page_asks_to_split_before_writing, setup),
        cmocka_unit_test_setup(test_fresh_job_reads_its_first_page_while_fencing, setup),
        cmocka_unit_test_setup(test_fresh_short_job_is_written_whole, setup),
        cmocka_unit_test_setup(test_mark_required_after_progress, setup),
        cmocka_unit_test_setup(test_mark_behind_postgres_stops, setup),
        cmocka_unit_test_setup(test_mark_lost_mid_fanout_stops, setup),
        cmocka_unit_test_setup(test_wrong_typed_key_waits_then_resumes, setup),
        cmocka_unit_test_setup(test_mark_is_recorded_before_the_first_page, setup),
    };
    return cmocka_run_group_tests_name("fanout/job", tests, NULL, NULL);
}
